"""One request fanned out to ranks, and the wait for their answers.

The wait watches, in one `multiprocessing.connection.wait` call:
- each pending rank's pipe (output, events, Done; closed: it died),
- each pending rank's sentinel, readable once the rank is gone: the process sentinel of a
  spawned rank, a pipe that the liveness monitor writes for an attached one (its
  connection closed, or its heartbeat stopped); report at once,
- a self-pipe written by our SIGINT handler (the kernel was interrupted).

Deadlines:
- once one rank has failed, its peers get the process-group timeout plus
  STUCK_MARGIN_S to come out of whatever collective they wait in;
- once interrupted, ranks get INTERRUPT_GRACE_S to stop; a second interrupt stops
  waiting at once.
Ranks still running after a deadline are "stuck", and the session is broken. A death
ends the wait at once; a peer's error that came just before it (ECHO_S) is the death's
echo, a collective that lost its peer, and that peer counts as stuck.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from multiprocessing.connection import wait

from fsdp_nb.session import protocol as P
from fsdp_nb.session.launcher import recv
from fsdp_nb.session.results import CellResult, rank_list

ECHO_S = 0.5  # a peer's error this soon before a death is the death's echo (Exchange._drop_echoes)


class _InterruptRelay:
    """While a request waits, SIGINT wakes the wait loop instead of raising mid-recv.

    Raising KeyboardInterrupt inside Connection.recv could cut a message in half
    and desynchronise the pipe, so the handler only counts and writes a byte.
    """

    _fds: tuple[int, int] | None = None

    def __init__(self):
        if _InterruptRelay._fds is None:
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            _InterruptRelay._fds = (r, w)
        self.fd = _InterruptRelay._fds[0]
        self.count = 0
        self._prev = None

    def _handler(self, signum, frame):
        self.count += 1
        try:
            os.write(_InterruptRelay._fds[1], b"!")
        except BlockingIOError:
            pass

    def drain(self) -> None:
        try:
            while os.read(self.fd, 512):
                pass
        except BlockingIOError:
            pass

    def __enter__(self):
        self.drain()
        if threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)


def _read(conn) -> tuple[list, bool]:
    """The messages `conn` holds now, and whether it is still open."""
    msgs = []
    while True:
        try:
            if not conn.poll():
                return msgs, True
        except (EOFError, OSError):
            return msgs, False
        msg = recv(conn)
        if msg is None:
            return msgs, False
        msgs.append(msg)


class Exchange:
    """Send one message to each rank in `msgs`, then collect their output, events and Done.

    Everything it needs comes in as arguments: the rank processes, the request id,
    the event handlers and the two deadlines, so it never reaches into the Session.
    """

    def __init__(
        self,
        ranks: list,
        msgs: dict[int, object],
        out,
        *,
        request_id: int,
        handlers: list,
        stuck_after_s: float,
        interrupt_grace_s: float,
    ):
        self.ranks, self.msgs, self.out, self.id = ranks, msgs, out, request_id
        self.handlers = handlers  # callables (rank, kind, payload), called for every Event
        self.stuck_after_s = stuck_after_s  # once a rank failed: pg timeout + margin for its peers
        self.interrupt_grace_s = interrupt_grace_s
        self.result = CellResult(ranks=sorted(msgs), world_size=len(ranks))
        self.pending = set(msgs)
        self.deadline: float | None = None
        self.failed_at: dict[int, float] = {}  # rank -> when its Done with an error came

    def run(self) -> CellResult:
        ranks = self.ranks
        for r, msg in self.msgs.items():
            msg.id = self.id
            try:
                ranks[r].conn.send(msg)
            except OSError:
                pass  # the sentinel reports the death below
        try:
            with _InterruptRelay() as relay:
                self._wait(ranks, relay)
        finally:
            self.out.finish()
        self._judge()
        return self.result

    def _wait(self, ranks, relay: _InterruptRelay) -> None:
        res, handled_interrupts = self.result, 0
        while self.pending:
            by_obj = {}
            for r in self.pending:
                by_obj[ranks[r].conn] = r
                by_obj[ranks[r].sentinel] = r
            timeout = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
            ready = wait(list(by_obj) + [relay.fd], timeout)
            if relay.count > handled_interrupts:
                relay.drain()
                handled_interrupts = relay.count
                if res.interrupted:  # a second interrupt: stop waiting now
                    self.deadline = time.monotonic()
                else:
                    res.interrupted = True
                    self._signal(sorted(self.pending))
                    self.deadline = time.monotonic() + self.interrupt_grace_s
            batch = [r for r in dict.fromkeys(by_obj.get(obj) for obj in ready) if r in self.pending]
            self._take(ranks, batch, ready)
            if res.died:
                break  # peers of a dead rank cannot finish their collectives
            if self.deadline is not None and time.monotonic() >= self.deadline:
                break
        res.stuck = sorted(self.pending)

    def _signal(self, ranks: list[int]) -> None:
        for r in ranks:
            self.ranks[r].interrupt()  # SIGINT for a spawned rank, a message for an attached one

    def _take(self, ranks, batch: list[int], ready: list) -> None:
        """Handle what the ranks in `batch` sent; a rank whose sentinel fired or whose pipe closed
        is gone (a forked rank's sentinel comes from the fork server, a few ms after the pipe
        closes), and what it managed to send is kept."""
        seen = time.monotonic()
        read = {r: _read(ranks[r].conn) for r in batch}
        for r in batch:
            for msg in read[r][0]:
                self._dispatch(r, msg)
        dead = [r for r in batch if not read[r][1] or ranks[r].sentinel in ready]
        for r in dead:
            self.result.died[r] = ranks[r].lost()
            self.pending.discard(r)
        if dead:
            self._drop_echoes(dead, seen)

    def _drop_echoes(self, dead: list[int], seen: float) -> None:
        """A peer's error that came just before a death was seen is the death's echo: its collective
        lost the peer, whose sockets can close a few ms before its pipe does. It is dropped, and the
        peer counts as stuck, as it would had its error come a moment after the death."""
        for r, at in list(self.failed_at.items()):
            if r not in dead and seen - at < ECHO_S:
                del self.result.dones[r], self.failed_at[r]
                self.result.order.remove(r)
                self.pending.add(r)

    def _dispatch(self, r: int, msg) -> None:
        kind = type(msg)
        if kind is P.Stream:
            self.out.stream(r, msg.name, msg.text)
        elif kind is P.Display:
            self.out.display(r, msg.data, msg.metadata)
        elif kind is P.Event:
            self._event(r, msg)
        elif kind is P.Done and msg.id == self.id:
            self.result.dones[r] = msg
            self.result.order.append(r)
            self.pending.discard(r)
            if msg.error is not None:
                self.failed_at[r] = time.monotonic()
                if self.pending and self.deadline is None:
                    self.deadline = time.monotonic() + self.stuck_after_s

    def _event(self, r: int, msg: P.Event) -> None:
        self.result.events.append((r, msg.kind, msg.payload))
        for handler in list(self.handlers):
            try:
                handler(r, msg.kind, msg.payload)
            except Exception as e:  # a broken display must not lose the cell
                print(f"fsdp_nb: event handler {handler!r} failed: {e}", file=sys.stderr)

    def _judge(self) -> None:
        res = self.result
        if res.died:
            res.broken = "; ".join(f"rank {r} {why}" for r, why in sorted(res.died.items()))
        elif res.stuck:
            res.broken = f"{rank_list(res.stuck)} did not finish"
        elif any(e.timeout for _, e in res.errors):
            res.broken = "a collective timed out, so the ranks are out of step"
