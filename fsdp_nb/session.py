"""Session: a persistent group of N spawned ranks, driven from the kernel.

    with Session(nprocs=2) as s:
        s.run("x = rank * 10")
        s.eval("x")            # [0, 10]

Every operation checks the explicit state (STARTING / READY / BUSY / BROKEN / CLOSED)
and says what to do when it is wrong. The wait loop watches each rank's pipe and
process sentinel together, so a dead rank is reported at once, a failed rank's peers
get the process-group timeout (plus a margin) to come out of their collective, and a
kernel interrupt is relayed to the ranks as KeyboardInterrupt.
"""
from __future__ import annotations

import atexit
import contextlib
import enum
import itertools
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
import types
import weakref
from multiprocessing.connection import wait

from fsdp_nb import protocol as P
from fsdp_nb.export import Step, script
from fsdp_nb.output import Silent, printer
from fsdp_nb.results import CellResult, RankError, rank_list
from fsdp_nb.session_config import SessionConfig
from fsdp_nb.worker import main as worker_main

INTERRUPT_GRACE_S = 2.0  # ranks get this long to stop after an interrupt
STUCK_MARGIN_S = 5.0  # after a rank fails, its peers get pg timeout + this to finish
CLOSE_GRACE_S = 5.0


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    BROKEN = "broken"
    CLOSED = "closed"


class SessionError(RuntimeError):
    """An operation that the session's state does not allow; the message says what to do."""


def _exit_description(code: int | None) -> str:
    if code is None:
        return "alive"
    if code < 0:
        try:
            return f"exited with signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"exited with signal {-code}"
    return f"exited with code {code}"


class _Rank:
    __slots__ = ("rank", "proc", "conn", "pid")

    def __init__(self, rank, proc, conn):
        self.rank, self.proc, self.conn, self.pid = rank, proc, conn, proc.pid


class Session:
    """N ranks in one process group, each with a persistent namespace.

    Each rank's namespace starts with `rank`, `world_size`, `device`, `torch`,
    `dist` (process group initialised) and `display`.
    """

    INTERRUPT_GRACE_S = INTERRUPT_GRACE_S
    STUCK_MARGIN_S = STUCK_MARGIN_S

    def __init__(self, nprocs: int = 2, *, device: str = "cpu", backend: str | None = None,
                 timeout: float = 60.0, threads: int = 1, start: bool = True):
        self.config = SessionConfig(nprocs=nprocs, device=device, backend=backend,
                                    timeout=timeout, threads=threads)
        self.state = State.CLOSED
        self.broken_reason: str | None = None
        self.torch_version = ""
        self.history: list[Step] = []  # cells that succeeded, and pushes: what export() writes
        self.event_handlers: list = []  # callables (rank, kind, payload)
        self.running: tuple[str, float] | None = None  # (source, start time) of the cell in flight
        self._ranks: list[_Rank] = []
        self._ids = itertools.count(1)
        self._cells = itertools.count(1)
        self._lock = threading.Lock()
        self._store = None
        _live.add(self)
        if start:
            self.start()

    # ---- lifecycle ----------------------------------------------------------------
    def start(self) -> "Session":
        if self.state not in (State.CLOSED,):
            raise SessionError(f"the session is {self.state.value}; use restart() to start it again")
        import torch.distributed as dist  # the kernel hosts the rendezvous store

        cfg = self.config
        self.state, self.broken_reason = State.STARTING, None
        self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        opts = dict(host="127.0.0.1", port=self._store.port, backend=cfg.backend, device=cfg.device,
                    timeout=cfg.timeout, threads=cfg.threads, parent_pid=os.getpid())
        ctx = mp.get_context("spawn")
        # Spawned children inherit the environment at start: one thread each.
        with _spawn_environment(cfg.threads):
            for r in range(cfg.nprocs):
                parent_end, child_end = ctx.Pipe(duplex=True)
                proc = ctx.Process(target=worker_main, args=(r, cfg.nprocs, child_end, opts),
                                   name=f"fsdp_nb-rank{r}")
                proc.start()
                child_end.close()
                self._ranks.append(_Rank(r, proc, parent_end))
        self._wait_ready(deadline=time.monotonic() + cfg.timeout + 60)
        self.state = State.READY
        return self

    def _wait_ready(self, deadline: float) -> None:
        waiting = {rk.conn: rk for rk in self._ranks}
        sentinels = {rk.proc.sentinel: rk for rk in self._ranks}
        problem = None
        while waiting and problem is None:
            left = deadline - time.monotonic()
            if left <= 0:
                problem = f"{rank_list(r.rank for r in waiting.values())} did not join the process group in time"
                break
            for obj in wait(list(waiting) + list(sentinels), timeout=left):
                rk = waiting.pop(obj, None)
                if rk is not None:
                    msg = _recv(rk.conn)
                    if isinstance(msg, P.Ready):
                        self.torch_version = msg.torch_version
                        continue
                    problem = f"rank {rk.rank} could not start: {msg.error if msg else 'pipe closed'}"
                elif obj in sentinels and sentinels[obj].conn in waiting:
                    rk = sentinels[obj]
                    rk.proc.join(0.5)
                    problem = f"rank {rk.rank} {_exit_description(rk.proc.exitcode)} while starting"
        if problem:
            self._kill()
            self.state = State.CLOSED
            raise SessionError(problem)

    def close(self) -> None:
        """Stop every rank: a clean process-group exit when possible, SIGKILL otherwise."""
        if self.state == State.CLOSED:
            return
        if self.state == State.READY:
            self._graceful_shutdown()
        self._kill()
        self.state = State.CLOSED

    def restart(self) -> "Session":
        """Kill the ranks and start fresh ones with the same options. Namespaces are lost."""
        self.close()
        self.history.clear()
        return self.start()

    def _graceful_shutdown(self) -> None:
        for rk in self._ranks:
            try:
                rk.conn.send(P.Shutdown())
            except OSError:
                pass
        deadline = time.monotonic() + CLOSE_GRACE_S
        for rk in self._ranks:
            rk.proc.join(max(0.0, deadline - time.monotonic()))

    def _kill(self) -> None:
        for rk in self._ranks:
            if rk.proc.exitcode is None:
                rk.proc.kill()
        for rk in self._ranks:
            rk.proc.join(5)
            rk.conn.close()
        self._ranks = []
        self._store = None

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<fsdp_nb.Session {self.config.summary()}, {self.state.value}>"

    # ---- state --------------------------------------------------------------------
    @property
    def pids(self) -> list[int]:
        return [rk.pid for rk in self._ranks]

    def _check_ready(self) -> None:
        if self.state == State.READY:
            dead = [(rk.rank, rk.proc.exitcode) for rk in self._ranks if rk.proc.exitcode is not None]
            if dead:
                self._mark_broken("; ".join(f"rank {r} {_exit_description(c)}" for r, c in dead))
        if self.state == State.READY:
            return
        advice = {
            State.CLOSED: "no session is running: start one with %fsdp_launch -n 2 (or Session(2))",
            State.STARTING: "the session is still starting; wait for it",
            State.BUSY: "the session is busy with another cell; wait, or interrupt it",
            State.BROKEN: f"the session is broken ({self.broken_reason}); run %fsdp_restart (or session.restart())",
        }
        raise SessionError(advice[self.state])

    def _mark_broken(self, why: str) -> None:
        self.state, self.broken_reason = State.BROKEN, why

    def status(self) -> list[dict]:
        """One row per rank: pid, whether it is alive, and the cell it is running."""
        running = None
        if self.running:
            src, t0 = self.running
            lines = src.strip().splitlines() or [""]
            running = f"{lines[0]}{' ...' if len(lines) > 1 else ''} ({time.monotonic() - t0:.1f} s)"
        return [dict(rank=rk.rank, pid=rk.pid, alive=rk.proc.exitcode is None,
                     process=_exit_description(rk.proc.exitcode), state=self.state.value, running=running)
                for rk in self._ranks]

    # ---- requests -----------------------------------------------------------------
    def run(self, source: str, *, ranks: list[int] | None = None, collate: bool | None = None,
            output=None, want_result: bool = True, record: bool = True) -> CellResult:
        """Run `source` on every rank (or on `ranks`) and return the CellResult.

        Output streams as it arrives (or collated at the end). Errors do not raise
        here: call `.raise_errors()`, or use `eval`.
        """
        targets = self._targets(ranks)
        cell = next(self._cells)
        result = self._request({r: P.Execute(0, source, cell, want_result) for r in targets},
                               output if output is not None else printer(collate), source)
        if result.ok and record:
            self.history.append(Step(source=source, ranks=tuple(targets) if ranks is not None else None))
        return result

    def eval(self, expr: str, *, ranks: list[int] | None = None) -> list:
        """The value of `expr` on each rank, as a list indexed by rank. Raises RankError on failure."""
        return self.run(expr, ranks=ranks, output=Silent(), record=False).raise_errors().values

    def push(self, values: dict | None = None, /, **named) -> None:
        """Bind names on every rank to copies of the given objects (they must pickle)."""
        values = {**(values or {}), **named}
        try:
            payload = pickle.dumps(values, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:
            bad = [k for k, v in values.items() if not _picklable(v)]
            raise SessionError(f"cannot send {', '.join(bad) or 'the values'} to the ranks: "
                               f"{type(e).__name__}: {e}; send data (tensors, numbers, state dicts) "
                               f"and rebuild objects on the ranks") from None
        self._request({r: P.Push(0, payload) for r in self._targets(None)}, Silent(), None).raise_errors()
        self.history.append(Step(pushed=values))

    def export(self) -> tuple[str, list[str]]:
        """This session's successful cells and pushes as a torchrun script, plus warnings."""
        c = self.config
        return script(self.history, nprocs=c.nprocs, device=c.device, backend=c.backend,
                      timeout=c.timeout, threads=c.threads)

    def pull(self, name: str, *, ranks: list[int] | None = None) -> list:
        """The value bound to `name` on each rank, as a list indexed by rank."""
        result = self._request({r: P.Pull(0, name) for r in self._targets(ranks)}, Silent(), None)
        missing = [r for r, e in result.errors if e.type == "NameError"]
        if missing:
            raise SessionError(f"{rank_list(missing)} {'has' if len(missing) == 1 else 'have'} no variable "
                               f"{name!r}; define it in a %%fsdp cell first")
        unpicklable = [r for r in result.dones if result.dones[r].note]
        if unpicklable:
            r = unpicklable[0]
            raise SessionError(f"{name!r} on rank {r} cannot be sent to the notebook: {result.dones[r].note}")
        return result.raise_errors().values

    def interrupt(self) -> None:
        """Raise KeyboardInterrupt in the code running on every rank (idle ranks ignore it)."""
        for rk in self._ranks:
            if rk.proc.exitcode is None:
                os.kill(rk.pid, signal.SIGINT)

    def _targets(self, ranks) -> list[int]:
        self._check_ready()
        if ranks is None:
            return list(range(self.config.nprocs))
        bad = [r for r in ranks if not isinstance(r, int) or not 0 <= r < self.config.nprocs]
        if bad or not ranks:
            raise SessionError(f"ranks={ranks!r} is not valid: give ranks between 0 and {self.config.nprocs - 1}")
        return sorted(set(ranks))

    def _request(self, msgs: dict[int, object], out, source: str | None) -> CellResult:
        if not self._lock.acquire(blocking=False):
            raise SessionError("the session is busy with another cell; wait, or interrupt it")
        try:
            self.state = State.BUSY
            self.running = (source, time.monotonic()) if source is not None else None
            result = _Exchange(self, msgs, out).run()
            if result.broken:
                self._mark_broken(result.broken)
            elif self.state == State.BUSY:
                self.state = State.READY
            return result
        finally:
            self.running = None
            self._lock.release()


from fsdp_nb.exchange import _Exchange, _recv  # noqa: E402  (uses State/Session names above)


@contextlib.contextmanager
def _spawn_environment(threads: int):
    """What spawned ranks inherit: one OpenMP pool of `threads`, and no __main__ to re-run.

    Cells travel as source text, so ranks never need the parent's main module; without
    this swap, spawn re-imports a script's __main__ and demands an
    `if __name__ == "__main__"` guard from every user script.
    """
    saved_env = os.environ.get("OMP_NUM_THREADS")
    saved_main = sys.modules.get("__main__")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = saved_main
        if saved_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved_env


def _picklable(v) -> bool:
    try:
        pickle.dumps(v)
        return True
    except Exception:
        return False


# Registered after multiprocessing's own exit hook, so it runs first (atexit is LIFO):
# multiprocessing would otherwise join our still-running ranks forever.
_live: "weakref.WeakSet[Session]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for s in list(_live):
        try:
            s._kill()
        except Exception:
            pass
