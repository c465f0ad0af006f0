"""The rank side of a session: one process per rank, forked from the fork server or spawned.

`main` is the process target, so it must live in an importable module. It takes what a
spawned rank would inherit from the kernel (environment, thread count), joins the process
group, then loops: receive a request, run it in the rank's persistent namespace, stream
output and events back, finish with one Done.

Lifetime rules (docs/architecture.md, "Signals"):
- The rank sits in its own session (setsid, as torchrun does), so a Ctrl-C or a kernel interrupt aimed at
  the kernel's group never reaches it directly; the kernel relays interrupts, and a
  SIGINT only raises KeyboardInterrupt while user code runs.
- A watchdog thread exits the rank within 0.2 s of the kernel dying (SIGKILL included: the
  lifeline pipe, whose other end only the kernel holds, reads EOF) or of its parent (the fork
  server, or the kernel) going; a closed pipe (EOF) does the same when the rank is idle. No orphans.
- Exit is barrier -> destroy_process_group -> os._exit, which keeps gloo from
  aborting at interpreter teardown.
- Every exit, the kernel's death included, first finishes the rank's background
  work (an async checkpoint being written), up to `pending.FINISH_TIMEOUT_S`; on a
  Shutdown the rank tells the kernel it is doing so, and the kernel waits as long.
"""

from __future__ import annotations

import builtins
import os
import pickle
import signal
import sys
import threading
import time
import types
from typing import NoReturn

from fsdp_nb.rank import events, pending
from fsdp_nb.rank.cells import RankStream, mime_bundle, run_source
from fsdp_nb.rank.errors import format_error
from fsdp_nb.session import protocol as P

WATCHDOG_PERIOD_S = 0.2


class _Rank:
    """Per-process state: the pipe, the namespace and the id of the request in flight."""

    def __init__(self, rank: int, world_size: int, conn):
        self.rank, self.world_size, self.conn = rank, world_size, conn
        self.request_id = 0
        self.executing = False  # SIGINT raises KeyboardInterrupt only while True
        self.sender: int | None = None  # thread writing to the pipe now, if any
        self.interrupt_pending = False  # a SIGINT that arrived mid-send, raised once the send is done
        self._lock = threading.Lock()
        self.ns: dict = {}

    def send(self, msg) -> None:
        with self._lock:  # user threads may print while the main thread sends Done
            self.sender = threading.get_ident()
            try:
                self.conn.send(msg)  # a big message is several writes: it must not be cut short
            finally:
                self.sender = None
        if self.interrupt_pending and self.executing and threading.current_thread() is threading.main_thread():
            self.interrupt_pending = False
            raise KeyboardInterrupt

    def on_sigint(self, signum, frame) -> None:
        if not self.executing:
            return  # idle ranks ignore interrupts
        if self.sender == threading.main_thread().ident:
            self.interrupt_pending = True  # raising now would leave half a message in the pipe
            return
        raise KeyboardInterrupt

    # ---- rank-side conveniences bound into the namespace -------------------------
    def display(self, *objs, **_ignored) -> None:
        """Show objects in the notebook, marked with this rank (like IPython's display)."""
        sys.stdout.flush()
        for obj in objs:
            data, metadata = mime_bundle(obj)
            self.send(P.Display(self.request_id, self.rank, data, metadata))

    def emit(self, kind: str, payload: dict) -> None:
        self.send(P.Event(self.request_id, self.rank, kind, payload))


_exiting = threading.Lock()


def _exit(code: int) -> NoReturn:
    """End the process, after the background work it started (a checkpoint being written).

    The watchdog and the main thread may both get here when the kernel dies; the second
    waits on the lock, and the process ends from the first."""
    with _exiting:
        pending.finish()  # bounded: pending.FINISH_TIMEOUT_S
        os._exit(code)


def _watch_kernel(lifeline, parent_pid: int) -> None:
    while not lifeline.poll(WATCHDOG_PERIOD_S):  # EOF: the kernel is gone, however it died
        if os.getppid() != parent_pid:
            break
    _exit(70)


def _take_start_options(rank: int, world_size: int, opts: dict) -> None:
    """What a spawned rank inherits from the kernel, set here, before any thread starts: a forked
    rank has the fork server's environment and state ([Note: fork safety] in session/forkserver.py)."""
    os.environ.clear()
    os.environ.update(
        opts["env"],  # the kernel's environment at launch
        OMP_NUM_THREADS=str(opts["threads"]),
        MPLBACKEND="module://fsdp_nb.rank.mpl_backend",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),  # one machine: FSDP1's hybrid strategies count nodes by it
        WORLD_SIZE=str(world_size),
        MASTER_ADDR=opts["host"],
        MASTER_PORT=str(opts["port"]),
    )
    import torch

    torch.set_num_threads(opts["threads"])  # OpenMP read OMP_NUM_THREADS when torch loaded: in the server
    torch.default_generator.seed()  # a forked rank would share the server's CPU random numbers


def _init_process_group(rank: int, world_size: int, opts: dict):
    import datetime

    import torch
    import torch.distributed as dist

    if opts["device"] == "cuda":
        if torch.cuda.device_count() <= rank:
            raise RuntimeError(f"rank {rank} needs GPU {rank} but only {torch.cuda.device_count()} are visible")
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    # The kernel holds the store's server socket, so the port cannot be taken by
    # another session between choosing it and using it.
    store = dist.TCPStore(
        opts["host"], opts["port"], is_master=False, timeout=datetime.timedelta(seconds=opts["timeout"])
    )
    dist.init_process_group(
        opts["backend"],
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=opts["timeout"]),
    )
    return torch, dist, device


def _namespace(state: _Rank, torch, dist, device) -> dict:
    main_mod = types.ModuleType("__main__")  # cell-defined classes pickle as __main__.X
    sys.modules["__main__"] = main_mod
    ns = main_mod.__dict__
    ns.update(
        __builtins__=builtins,
        rank=state.rank,
        world_size=state.world_size,
        device=device,
        torch=torch,
        dist=dist,
        display=state.display,
    )
    return ns


def main(rank: int, world_size: int, conn, opts: dict, lifeline) -> None:
    """Process target: run rank `rank` of `world_size` until Shutdown or the kernel goes away."""
    os.setsid()  # like torchrun's workers: interrupts come only via the kernel; each rank its own sched autogroup
    parent_pid = os.getppid()
    state = _Rank(rank, world_size, conn)
    try:
        _take_start_options(rank, world_size, opts)
        threading.Thread(target=_watch_kernel, args=(lifeline, parent_pid), daemon=True).start()
        signal.signal(signal.SIGINT, state.on_sigint)
        torch, dist, device = _init_process_group(rank, world_size, opts)
    except BaseException as e:  # report, then exit: the kernel turns this into one line
        conn.send(P.StartFailed(rank, f"{type(e).__name__}: {e}"))
        os._exit(1)
    serve(state, torch, dist, device, opts["backend"])


def serve(state: _Rank, torch, dist, device, backend: str) -> NoReturn:
    """Once in the process group: bind the namespace and output, say Ready, serve requests until exit.
    Shared by spawned ranks (main) and ranks that torchrun started and attached (rank/attached.py)."""
    state.ns = _namespace(state, torch, dist, device)
    _current_rank.append(state)
    sys.stdout = RankStream("stdout", state)
    sys.stderr = RankStream("stderr", state)
    events.set_sink(state.emit)
    state.conn.send(P.Ready(state.rank, os.getpid(), torch.__version__, backend, str(device)))
    _loop(state, dist)


def _loop(state: _Rank, dist) -> NoReturn:
    """Serve requests until the process ends: it never returns, it exits (os._exit) on
    Shutdown, on a closed pipe, or from the watchdog when the kernel dies."""
    handlers = {P.Execute: _execute, P.Push: _push, P.Pull: _pull}
    while True:
        try:
            msg = state.conn.recv()
        except (EOFError, OSError):  # the kernel closed the pipe or died
            _exit(0)
        if isinstance(msg, P.Shutdown):
            _shutdown(state, dist, msg)  # NoReturn: the process exits inside
        state.request_id = msg.id
        t0 = time.perf_counter()
        done = handlers[type(msg)](state, msg)
        sys.stdout.flush()
        sys.stderr.flush()
        done.elapsed = time.perf_counter() - t0
        state.send(done)


def _execute(state: _Rank, msg: P.Execute) -> P.Done:
    done = P.Done(msg.id, state.rank)
    try:
        state.executing = True
        try:
            value = run_source(msg.source, f"<cell {msg.cell}>", state.ns)
            _show_open_figures()
        finally:
            state.executing = False
    except BaseException as e:  # KeyboardInterrupt and SystemExit too: the rank lives on
        done.error = format_error(e)
        return done
    if msg.want_result and value is not None:
        _attach_value(done, value)
    return done


# Pickles that load on a rank but not in the kernel: names the kernel cannot resolve.
_KERNEL_CANNOT_LOAD = (
    (b"__main__", "it is an instance of a class defined in a cell, which the notebook does not have"),
    (
        b"torch.distributed",
        "it holds process-group state (a DTensor, DeviceMesh or sharded module) that only "
        "exists on the ranks; send .full_tensor(), .to_local() or a state_dict() instead",
    ),
)


def _attach_value(done: P.Done, value) -> None:
    try:
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:
        done.value_repr, done.note = repr(value), f"it is not picklable ({type(e).__name__}: {e})"
        return
    for marker, why in _KERNEL_CANNOT_LOAD:
        if marker in data:
            done.value_repr, done.note = repr(value), why
            return
    done.value = data


def _show_open_figures() -> None:
    # Like the inline backend: figures left open by a cell are shown when it ends.
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None and plt.get_fignums():
        plt.show()


def _push(state: _Rank, msg: P.Push) -> P.Done:
    done = P.Done(msg.id, state.rank)
    try:
        state.ns.update(pickle.loads(msg.payload))
    except BaseException as e:
        done.error = format_error(e)
    return done


def _pull(state: _Rank, msg: P.Pull) -> P.Done:
    done = P.Done(msg.id, state.rank)
    if msg.name not in state.ns:
        done.error = P.RemoteError("NameError", f"name {msg.name!r} is not defined on rank {state.rank}", "")
        return done
    _attach_value(done, state.ns[msg.name])
    return done


def _shutdown(state: _Rank, dist, msg: P.Shutdown) -> NoReturn:
    """Finish background work, leave the process group, answer Done, and exit: this never returns."""
    try:
        busy = pending.pending()
        if busy:  # the kernel stretches its grace period to match, and says so
            state.send(P.Finishing(state.rank, "; ".join(busy), pending.FINISH_TIMEOUT_S))
            left = pending.finish()
            if left:
                os._exit(P.ABANDONED_EXIT)  # the kernel names what was abandoned
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        try:
            state.send(P.Done(msg.id, state.rank))
        finally:
            os._exit(0)


_current_rank: list[_Rank] = []  # the one _Rank of this process, for rank_mpl.show()


def display(*objs) -> None:
    """Module-level display for code that imports it (e.g. the matplotlib backend)."""
    if _current_rank:
        _current_rank[0].display(*objs)
