"""Starting and stopping a session's rank processes.

`RankGroup.spawn(config)` starts N fresh ranks, forked from the warm fork server
(`forkserver`) or, as the fallback, spawned, and waits until each has joined the process
group; `stop()` ends them, cleanly when it can. Every live group is killed at
interpreter exit, before multiprocessing's own exit hook would wait on them forever.

A forked rank inherits the fork server's environment, not the kernel's, so the start
options travel in the process arguments: the kernel's environment at launch, the thread
count, the rendezvous address, and the lifeline, a pipe whose write end only the kernel
holds, so that every rank sees EOF the moment the kernel dies, however it dies.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing as mp
import os
import signal
import time
import weakref
from multiprocessing.connection import wait

from fsdp_nb.rank.worker import main as worker_main
from fsdp_nb.session import forkserver
from fsdp_nb.session import protocol as P
from fsdp_nb.session.errors import SessionError
from fsdp_nb.session.results import rank_list

START_MARGIN_S = 60.0  # on top of the pg timeout: importing torch in a cold process is slow
CLOSE_GRACE_S = 5.0


def exit_description(code: int | None) -> str:
    if code is None:
        return "alive"
    if code < 0:
        try:
            return f"exited with signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"exited with signal {-code}"
    return f"exited with code {code}"


def recv(conn):
    try:
        return conn.recv()
    except (EOFError, OSError):
        return None


def gone(proc) -> str:
    """How a rank whose pipe closed or whose sentinel fired ended. Its pipe closes first: a forked
    rank's exit code comes from the fork server, a few ms after the process is gone."""
    proc.join(0.5)
    return exit_description(proc.exitcode) if proc.exitcode is not None else "closed its pipe"


class RankProc:
    __slots__ = ("rank", "proc", "conn", "pid")

    def __init__(self, rank, proc, conn):
        self.rank, self.proc, self.conn, self.pid = rank, proc, conn, proc.pid

    # The rank handle that exchange.py and session.py use; attached ranks (session/attached.py) answer
    # the same: a sentinel readable once the rank is gone, why it is gone, and how to interrupt it.
    host = "localhost"

    @property
    def sentinel(self):
        return self.proc.sentinel

    def exit_reason(self) -> str | None:
        """None while the process lives; how it ended otherwise."""
        return None if self.proc.exitcode is None else exit_description(self.proc.exitcode)

    def lost(self) -> str:
        """After the sentinel fired or the pipe closed: how the process ended."""
        return gone(self.proc)

    def interrupt(self) -> None:
        if self.proc.exitcode is None:
            os.kill(self.pid, signal.SIGINT)


@contextlib.contextmanager
def _start_environment(threads: int):
    """What started ranks inherit: one OpenMP pool of `threads`, and no __main__ to re-run."""
    with forkserver.bare_main(), forkserver.environment({"OMP_NUM_THREADS": str(threads)}):
        yield


class RankGroup:
    """The processes, pipes, lifeline and rendezvous store of one session start."""

    def __init__(self, ranks: list[RankProc], store, torch_version: str, lifeline=None):
        self.ranks, self.store, self.torch_version, self.lifeline = ranks, store, torch_version, lifeline
        _live.add(self)

    @classmethod
    def spawn(cls, cfg) -> RankGroup:
        """Start `cfg.nprocs` fresh ranks, forked from the fork server (or spawned: the fallback)."""
        try:
            return cls._start(cfg, forkserver.context())
        except forkserver.ServerFailed as e:  # only the fork server's context raises it
            forkserver.failed(e)
            return cls._start(cfg, mp.get_context("spawn"))

    @classmethod
    def _start(cls, cfg, ctx) -> RankGroup:
        import torch.distributed as dist

        # The kernel holds the store's server socket, so no other session can take
        # the port between choosing it and using it.
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        lifeline_r, lifeline_w = ctx.Pipe(duplex=False)
        group = cls([], store, "", lifeline_w)
        try:  # an interrupt (or any error) while starting must not leave ranks behind
            with _start_environment(cfg.threads):
                opts = dict(
                    host="127.0.0.1",
                    port=store.port,
                    backend=cfg.backend,
                    device=cfg.device,
                    timeout=cfg.timeout,
                    threads=cfg.threads,
                    env=dict(os.environ),  # a forked rank has the server's: it takes the kernel's from here
                )
                for r in range(cfg.nprocs):
                    parent_end, child_end = ctx.Pipe(duplex=True)
                    proc = ctx.Process(
                        target=worker_main,
                        args=(r, cfg.nprocs, child_end, opts, lifeline_r),
                        name=f"fsdp_nb-rank{r}",
                    )
                    _start_process(proc, ctx)
                    child_end.close()
                    group.ranks.append(RankProc(r, proc, parent_end))
            lifeline_r.close()
            group._wait_ready(time.monotonic() + cfg.timeout + START_MARGIN_S)
        except BaseException:
            lifeline_r.close()
            group.kill()
            raise
        return group

    def _wait_ready(self, deadline: float) -> None:
        waiting = {rk.conn: rk for rk in self.ranks}
        sentinels = {rk.proc.sentinel: rk for rk in self.ranks}
        problem = None
        while waiting and problem is None:
            left = deadline - time.monotonic()
            if left <= 0:
                problem = f"{rank_list(r.rank for r in waiting.values())} did not join the process group in time"
                break
            for obj in wait(list(waiting) + list(sentinels), timeout=left):
                rk = waiting.pop(obj, None)
                if rk is not None:
                    msg = recv(rk.conn)
                    if isinstance(msg, P.Ready):
                        self.torch_version = msg.torch_version
                        continue
                    if msg is not None:
                        problem = f"rank {rk.rank} could not start: {msg.error}"
                    else:
                        problem = f"rank {rk.rank} {gone(rk.proc)} while starting"
                elif obj in sentinels and sentinels[obj].conn in waiting:
                    problem = f"rank {sentinels[obj].rank} {gone(sentinels[obj].proc)} while starting"
        if problem:
            raise SessionError(problem)

    def stop(self, graceful: bool) -> None:
        """Barrier, destroy_process_group and exit on every rank when `graceful`; then SIGKILL stragglers.

        A rank still writing an async checkpoint says so (Finishing) and gets that long to
        finish it: one line tells the user why closing takes a while, and another which
        checkpoint was abandoned if it did not finish."""
        if graceful:
            for rk in self.ranks:
                try:
                    rk.conn.send(P.Shutdown())
                except OSError:
                    pass
            finishing = self._wait_exit(time.monotonic() + CLOSE_GRACE_S)
            alive = [rk.rank for rk in self.ranks if rk.proc.exitcode is None]
            abandoned = finishing and (alive or any(rk.proc.exitcode == P.ABANDONED_EXIT for rk in self.ranks))
            if abandoned:
                print(f"fsdp_nb: abandoned {finishing}: not finished in time; it stays incomplete and never loads")
        self.kill()

    def _wait_exit(self, deadline: float) -> str | None:
        """Wait for every rank to exit, reading what they send meanwhile; returns the background
        work a rank said it was finishing (the deadline stretched to cover it), or None."""
        finishing = None
        conns = {rk.conn: rk for rk in self.ranks}
        while True:
            # One reading of who is alive: a rank that exits between two readings must not leave
            # `wait` with nothing to watch, which would sleep until the deadline.
            sentinels = [rk.proc.sentinel for rk in self.ranks if rk.proc.exitcode is None]
            left = deadline - time.monotonic()
            if not sentinels or left <= 0:
                break
            for obj in wait(list(conns) + sentinels, timeout=min(left, 1.0)):
                if obj not in conns:
                    continue  # a rank exited: the loop condition sees it
                msg = recv(obj)
                if msg is None:
                    del conns[obj]  # closed: the rank is exiting
                elif isinstance(msg, P.Finishing) and finishing is None:
                    finishing = msg.what
                    deadline = max(deadline, time.monotonic() + msg.timeout + CLOSE_GRACE_S)
                    print(f"fsdp_nb: waiting up to {msg.timeout:.0f} s for {msg.what} to finish writing")
        return finishing

    def kill(self) -> None:
        for rk in self.ranks:
            if rk.proc.exitcode is None:
                rk.proc.kill()
        for rk in self.ranks:
            rk.proc.join(5)
            rk.conn.close()
        if self.lifeline is not None:
            self.lifeline.close()  # after the joins: a rank reading EOF here would exit mid-shutdown
            self.lifeline = None
        self.store = None
        _live.discard(self)


def _start_process(proc, ctx) -> None:
    """proc.start(); through the fork server, a failure to reach it becomes ServerFailed."""
    try:
        proc.start()
    except (OSError, EOFError) as e:  # connection refused, or the server exited mid-request
        if ctx.get_start_method() != "forkserver":
            raise
        raise forkserver.ServerFailed(f"{type(e).__name__}: {e}") from e


# Registered after multiprocessing's own exit hook, so it runs first (atexit is LIFO):
# multiprocessing would otherwise join our still-running ranks forever.
_live: weakref.WeakSet[RankGroup] = weakref.WeakSet()


@atexit.register
def _kill_all() -> None:
    for group in list(_live):
        try:
            group.kill()
        except Exception:
            pass
