"""The ranks of an attached session, as the kernel sees them: handles, liveness, stop.

A spawned rank is a child process: its sentinel says when it dies, SIGINT interrupts
it, and its exit code says how it ended. An attached rank runs on another machine
under torchrun, so none of that reaches the kernel. Each one instead keeps two
authenticated connections: the data connection (the protocol of a spawned rank's
pipe) and a control connection, on which both sides send a Heartbeat every second
and the kernel sends Interrupt. One monitor thread per group reads the control
connections; a rank whose connection closes, or that stays silent for SILENCE_S,
is lost: the monitor writes to the rank's sentinel pipe, which exchange.py waits on
exactly as it waits on a process sentinel. So a killed rank or node agent is named
within SILENCE_S (at once when its socket closes, which is the usual case).
"""

from __future__ import annotations

import os
import threading
import time
from multiprocessing.connection import wait

from fsdp_nb.session import protocol as P
from fsdp_nb.session.errors import SessionError
from fsdp_nb.session.launcher import CLOSE_GRACE_S, START_MARGIN_S, recv
from fsdp_nb.session.results import rank_list

HEARTBEAT_S = 1.0
SILENCE_S = 4.0  # no heartbeat for this long: the rank (or its node, or the network) is gone


class AttachedRank:
    """One attached rank: the same face as launcher.RankProc (conn, pid, sentinel, exit_reason, lost, interrupt)."""

    def __init__(self, hello: P.Hello, conn, token: str):
        self.rank, self.host, self.pid = hello.rank, hello.host, hello.pid
        self.conn, self.token = conn, token
        self.control = None  # the control connection, once the rank opened it
        self.reason: str | None = None  # why it is lost; None while it lives
        self.seen = time.monotonic()  # the last heartbeat
        self._send = threading.Lock()
        self._r, self._w = os.pipe()

    @property
    def sentinel(self) -> int:
        return self._r

    def exit_reason(self) -> str | None:
        return self.reason

    def lost(self) -> str:
        return self.reason or "was lost"

    def mark_lost(self, why: str) -> None:
        if self.reason is None:
            self.reason = f"(pid {self.pid} on {self.host}) was lost: {why}"
            try:
                os.write(self._w, b"x")
            except OSError:
                pass

    def send_control(self, msg) -> None:
        with self._send:  # the monitor's heartbeats and the main thread's interrupts
            try:
                self.control.send(msg)
            except (OSError, AttributeError):
                self.mark_lost("its control connection closed")

    def interrupt(self) -> None:
        if self.reason is None:
            self.send_control(P.Interrupt())

    def close(self) -> None:
        for conn in (self.conn, self.control):
            if conn is not None:
                conn.close()  # the rank reads EOF and exits 0, after its pending saves
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._r = self._w = -1


class AttachedGroup:
    """The attached ranks of one session start: the same face as launcher.RankGroup (ranks, stop, kill)."""

    def __init__(self, ranks: list[AttachedRank]):
        self.ranks, self.torch_version = ranks, ""
        self._closed = False
        self._monitor = threading.Thread(target=self._watch, name="fsdp_nb-heartbeat", daemon=True)
        self._monitor.start()

    def _watch(self) -> None:
        last_beat = 0.0
        while not self._closed:
            live = {rk.control: rk for rk in self.ranks if rk.reason is None}
            if not live:
                return
            try:
                ready = wait(list(live), timeout=HEARTBEAT_S / 2)
            except (OSError, ValueError):  # closed under us: kill() is ending the group
                return
            now = time.monotonic()
            for conn in ready:
                rk = live[conn]
                try:
                    conn.recv()  # a Heartbeat: the only thing a rank sends here
                    rk.seen = now
                except (EOFError, OSError):
                    rk.mark_lost("its connection closed (the process, its torchrun agent or its node is gone)")
            if now - last_beat >= HEARTBEAT_S:
                last_beat = now
                for rk in live.values():
                    rk.send_control(P.Heartbeat())
            for rk in live.values():
                if now - rk.seen > SILENCE_S:
                    rk.mark_lost(f"no heartbeat for {SILENCE_S:.0f} s (its node or the network is gone)")

    def wait_ready(self, timeout: float) -> None:
        """Wait for every rank's Ready, sent once it joined torchrun's process group."""
        deadline = time.monotonic() + timeout + START_MARGIN_S
        waiting = {rk.conn: rk for rk in self.ranks}
        sentinels = {rk.sentinel: rk for rk in self.ranks}
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SessionError(
                    f"{rank_list(r.rank for r in waiting.values())} did not join the process group in time"
                )
            for obj in wait(list(waiting) + list(sentinels), timeout=left):
                rk = waiting.pop(obj, None)
                if rk is not None:
                    msg = recv(rk.conn)
                    if isinstance(msg, P.Ready):
                        self.torch_version = msg.torch_version
                        continue
                    raise SessionError(f"rank {rk.rank} could not start: {msg.error if msg else 'connection closed'}")
                rk = sentinels[obj]
                if rk.conn in waiting:
                    raise SessionError(f"rank {rk.rank} {rk.lost()} while starting")

    def stop(self, graceful: bool) -> None:
        """Shutdown (barrier, destroy_process_group, exit 0) when `graceful`; then close every connection,
        which makes a rank that is still there exit 0 too, after its pending saves."""
        if graceful:
            for rk in self.ranks:
                try:
                    rk.conn.send(P.Shutdown())
                except OSError:
                    pass
            self._wait_done(time.monotonic() + CLOSE_GRACE_S)
        self.kill()

    def _wait_done(self, deadline: float) -> None:
        conns = {rk.conn: rk for rk in self.ranks if rk.reason is None}
        finishing: dict[int, str] = {}
        while conns and time.monotonic() < deadline:
            for conn in wait(list(conns), timeout=min(1.0, max(0.0, deadline - time.monotonic()))):
                msg = recv(conn)
                rk = conns[conn]
                if isinstance(msg, P.Done):
                    finishing.pop(rk.rank, None)
                if msg is None or isinstance(msg, P.Done):
                    del conns[conn]
                elif isinstance(msg, P.Finishing) and rk.rank not in finishing:
                    if not finishing:
                        print(f"fsdp_nb: waiting up to {msg.timeout:.0f} s for {msg.what} to finish writing")
                    finishing[rk.rank] = msg.what
                    deadline = max(deadline, time.monotonic() + msg.timeout + CLOSE_GRACE_S)
        if finishing:  # Finishing, then no Done: the rank gave up on it (or is still at it)
            print(f"fsdp_nb: abandoned {'; '.join(sorted(set(finishing.values())))}: not finished in time; "
                  "it stays incomplete and never loads")  # fmt: skip

    def kill(self) -> None:
        self._closed = True
        if self._monitor.is_alive() and self._monitor is not threading.current_thread():
            self._monitor.join(HEARTBEAT_S)
        for rk in self.ranks:
            rk.close()
