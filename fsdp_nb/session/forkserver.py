"""Warm starts: ranks forked from a server that has already imported torch.

A spawned rank is a fresh interpreter that spends a second or more importing torch before
it can join the process group; a rank forked from a process that has already imported it
starts in milliseconds. `%load_ext fsdp_nb` starts Python's multiprocessing fork server,
with `fsdp_nb.rank.preload` (torch, torch.distributed, the worker) as its preload, and
returns at once: the server imports torch while the user reads the notebook. Every start,
`%fsdp_launch`, `%fsdp_restart`, a launch with another -n, then forks fresh ranks from it:
ranks are never reused, each start gets new processes. `Session(...)` in plain Python
starts the server at its first start. A start that comes before the server is warm
waits for it rather than spawning: the server imports torch once, where N spawned ranks
would each import it, sharing the cores (a first Session on 2 cores: 1.3 s against 1.9 s
spawned for 2 ranks, 1.3 s against 3.3 s for 4).

Spawn stays the fallback: off Linux (no fork, or no /proc for the safety check), where
FSDP_NB_FORKSERVER=0, or when the server fails to start or refuses to fork (one line says
so, except for the user's own FSDP_NB_FORKSERVER=0).

[Note: fork safety]
The kernel itself never forks: it has threads (ipykernel's, torch's once it computes) and
perhaps a CUDA context, and a fork copies locks that its other threads may hold. The
server is a fresh interpreter, started by fork+exec as spawn starts one, that does
nothing but import and then wait in its accept loop, so each rank is forked from a
process with one thread, no CUDA context, no process group, and no file but the server's
own listener and pipes (which the child closes, keeping only the "alive" pipe below):
- `import torch` starts no thread and does not initialise CUDA; torch does that lazily,
  on first use. With --device cuda (nccl) every rank therefore creates its own CUDA
  context after the fork, as a spawned rank does, reading CUDA_VISIBLE_DEVICES and NCCL_*
  from the environment it was given; the server never touches a GPU.
- numpy, which torch imports, starts its OpenBLAS threads as it loads unless told not
  to: the server starts with OMP_NUM_THREADS=1 and OPENBLAS_NUM_THREADS=1.
- `fsdp_nb.rank.preload` checks all of it after importing (one OS thread in
  /proc/self/task, CUDA not initialised, no process group); a server that fails exits,
  and the kernel spawns instead.
A forked child has the server's environment and state, not the kernel's at launch, so
what spawn gave a rank implicitly travels explicitly (`launcher.RankGroup`):
- the kernel's whole environment at launch (OMP_NUM_THREADS set to --threads), which the
  worker installs before it starts any thread, then `torch.set_num_threads`, since the
  OpenMP runtime read OMP_NUM_THREADS=1 when the server loaded it. Only what is read
  while importing keeps the server's value (the kernel's environment when the server
  started): TORCH_LOGS, say, and numpy's OpenBLAS, which keeps one thread in a rank.
- the `__main__` swap, the working directory and sys.path, as with spawn
  (multiprocessing's preparation data);
- a fresh seed for torch's CPU generator (Python's `random` reseeds itself at fork), so
  ranks and restarts do not share the server's random numbers. Ranks do share the
  server's str hash seed, so a set of names iterates in the same order on every rank.
Lifetime: ranks exit within 0.2 s of the kernel dying, through the lifeline pipe whose
write end only the kernel holds, and when the server dies; the stdlib server exits once
the kernel and every rank have closed its "alive" pipe. So a SIGKILLed kernel leaves
no process behind (tests/test_warm_start.py).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.forkserver
import os
import sys
import threading
import types

from fsdp_nb.session.protocol import FORKSERVER_MARK

PRELOAD = ["fsdp_nb.rank.preload"]
SWITCH = "FSDP_NB_FORKSERVER"  # "0": always spawn
# What the server starts with: one OpenMP/OpenBLAS thread (no pool starts), and the mark
# that makes fsdp_nb.rank.preload check the server before it serves.
SERVER_ENVIRONMENT = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", FORKSERVER_MARK: "1"}

_lock = threading.Lock()
_off: str | None = None  # why ranks are spawned instead, once decided


class ServerFailed(Exception):
    """A start through the fork server failed: the server is gone or refused to fork."""


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """os.environ with `values` set, restored afterwards: what a process started inside inherits."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def bare_main():
    """No __main__ for a started process to re-run: cells travel as source text, so ranks never
    need the parent's main module; without this swap, multiprocessing re-imports a script's
    __main__ in every process it starts (spawned or forked from the server alike) and demands
    an `if __name__ == "__main__"` guard from every user script."""
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = saved


def _unavailable() -> tuple[str, bool] | None:
    """Why the fork server is not used here, and whether to say so; None when it is."""
    if os.environ.get(SWITCH, "1") == "0":
        return f"{SWITCH}=0", False  # the user's choice: nothing to say
    if not sys.platform.startswith("linux") or "forkserver" not in mp.get_all_start_methods():
        # Elsewhere native threads (macOS's libdispatch, say) hide from the safety check,
        # which counts them in /proc/self/task.
        return f"the fork server is only used on Linux (this is {sys.platform})", True
    return None


def _fall_back(why: str, *, say: bool = True) -> None:
    global _off
    _off = why
    if say:
        print(f"fsdp_nb: {why}; starting ranks with spawn instead (slower)")


def warm() -> None:
    """Start the fork server if it is not running, and return at once: it preloads in the
    background, and the first start waits for it. Never raises: a failure falls back to spawn."""
    with _lock:
        if _off is not None:
            return
        off = _unavailable()
        if off is not None:
            _fall_back(off[0], say=off[1])
            return
        try:
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD)  # no effect if the server already runs
            with environment(SERVER_ENVIRONMENT):
                multiprocessing.forkserver.ensure_running()  # starts it again if it died
        except Exception as e:
            _fall_back(f"the fork server did not start ({type(e).__name__}: {e})")


def import_torch_in_background() -> None:
    """At `%load_ext`: the kernel imports torch.distributed in a daemon thread while the user reads on.

    The kernel needs it for its rendezvous store at the first launch, and in a kernel that has
    not imported torch that import was most of the launch (about 1 s of 1.1 s on 2 cores).
    Python's per-module import locks make it safe: a cell, or the launch, that imports torch
    meanwhile waits for this import to finish instead of running a second one. Importing
    torch starts no thread and touches no GPU ([Note: fork safety]), and a failure here is
    silent: the launch imports it again and reports the error where the user sees it.
    """
    if "torch.distributed" in sys.modules:
        return

    def _import() -> None:
        try:
            import torch.distributed  # noqa: F401
        except Exception:
            pass

    global _kernel_import
    _kernel_import = threading.Thread(target=_import, name="fsdp_nb-import-torch", daemon=True)
    _kernel_import.start()


_kernel_import: threading.Thread | None = None


def context():
    """The multiprocessing context for the next start: the fork server's, or spawn's."""
    warm()
    return mp.get_context("spawn" if _off is not None else "forkserver")


def failed(error: BaseException) -> None:
    """A start through the server failed (`ServerFailed`): spawn from now on, saying so once."""
    with _lock:
        if _off is None:
            _fall_back(f"the fork server stopped ({error}; its reason is on the kernel's stderr)")


def wait(timeout: float = 120.0) -> bool:
    """Block until the server has preloaded (a no-op child is forked and reaped) and the kernel's own
    background import is done; False if the server is off. For benchmarks and tests that want a
    warm start before they time one."""
    if _kernel_import is not None:
        _kernel_import.join(timeout)
    ctx = context()
    if ctx.get_start_method() != "forkserver":
        return False
    proc = ctx.Process(target=os.getpid, name="fsdp_nb-forkserver-probe")
    with bare_main():
        proc.start()
    proc.join(timeout)
    return proc.exitcode == 0
