"""Session: a persistent group of N spawned ranks, driven from the kernel.

    with Session(nprocs=2) as s:
        s.run("x = rank * 10")
        s.eval("x")            # [0, 10]

The notebook's magics work on one session, the current one: `%fsdp_launch` makes
it, `session.activate()` binds one made in Python, and `current_session()` hands
it back to the user.

Every operation checks the explicit state (STARTING / READY / BUSY / BROKEN / CLOSED)
and says what to do when it is wrong. The wait loop watches each rank's pipe and
process sentinel together, so a dead rank is reported at once, a failed rank's peers
get the process-group timeout (plus a margin) to come out of their collective, and a
kernel interrupt is relayed to the ranks as KeyboardInterrupt.

`Session.listen(...)` makes a session whose ranks are not spawned here but started by
torchrun, on this machine or others, and attach to the kernel (fsdp_nb/session/attach.py);
once they have, it behaves as a spawned one.
"""

from __future__ import annotations

import atexit
import enum
import itertools
import pickle
import threading
import time
import weakref

from fsdp_nb.session import protocol as P
from fsdp_nb.session.dashboard import Dashboard
from fsdp_nb.session.errors import SessionError
from fsdp_nb.session.exchange import Exchange
from fsdp_nb.session.export import Step, script
from fsdp_nb.session.launcher import RankGroup
from fsdp_nb.session.options import SessionConfig
from fsdp_nb.session.output import CollatedPrinter, Silent, printer
from fsdp_nb.session.results import CellResult, RankError, rank_list

INTERRUPT_GRACE_S = 2.0  # ranks get this long to stop after an interrupt
STUCK_MARGIN_S = 5.0  # after a rank fails, its peers get pg timeout + this to finish


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    BROKEN = "broken"
    CLOSED = "closed"


class Session:
    """N ranks in one process group, each with a persistent namespace.

    Each rank's namespace starts with `rank`, `world_size`, `device`, `torch`,
    `dist` (process group initialised) and `display`.
    """

    INTERRUPT_GRACE_S = INTERRUPT_GRACE_S
    STUCK_MARGIN_S = STUCK_MARGIN_S

    def __init__(
        self,
        nprocs: int = 2,
        *,
        device: str = "cpu",
        backend: str | None = None,
        timeout: float = 60.0,
        threads: int = 1,
        start: bool = True,
        remote: bool = False,
    ):
        self.config = SessionConfig(
            nprocs=nprocs, device=device, backend=backend, timeout=timeout, threads=threads, remote=remote
        )
        self.endpoint = None  # attach mode: the fsdp_nb.session.attach.Endpoint the ranks join through
        self.state = State.CLOSED
        self.broken_reason: str | None = None
        self.torch_version = ""
        self.history: list[Step] = []  # cells that succeeded, and pushes: what export() writes
        # Rank events (progress, metrics) become a progress bar and a live loss plot: widgets
        # in a notebook, a text bar on stderr elsewhere. Curves persist across this session's cells.
        self.dashboard = Dashboard()
        self.event_handlers: list = [self.dashboard]  # callables (rank, kind, payload)
        self.running: tuple[str, float] | None = None  # (source, start time) of the cell in flight
        # The last request that failed on some rank, whole tracebacks kept: what %fsdp_tb prints
        # (`session.last_error.traceback()` in Python). Kept across restarts: it explains why one was needed.
        self.last_error: RankError | None = None
        self._group: RankGroup | None = None
        self._ids = itertools.count(1)
        self._cells = itertools.count(1)
        self._lock = threading.Lock()
        _open_sessions.add(self)
        if start:
            self.start()

    # ---- lifecycle ----------------------------------------------------------------
    def start(self) -> Session:
        """Spawn the ranks and wait until every one has joined the process group."""
        if self.state != State.CLOSED:
            raise SessionError(f"the session is {self.state.value}; use restart() to start it again")
        self.state, self.broken_reason = State.STARTING, None
        try:
            if self.endpoint is not None:  # attach mode: wait for torchrun's ranks to join
                self._group = self.endpoint.gather(self.config)
            else:
                self._group = RankGroup.spawn(self.config)
        except BaseException:  # KeyboardInterrupt too: the ranks are gone, so is the session
            self.state = State.CLOSED
            raise
        self.torch_version = self._group.torch_version
        self.state = State.READY
        return self

    def close(self) -> None:
        """Stop every rank: a clean process-group exit when possible, SIGKILL otherwise."""
        self._stop()
        if self.endpoint is not None:  # attach mode: no more joins; start() opens it again, same address
            self.endpoint.close()

    def _stop(self) -> None:
        if self.state == State.CLOSED:
            return
        if self._group is not None:
            self._group.stop(graceful=self.state == State.READY)
        self.state = State.CLOSED

    @classmethod
    def listen(cls, address: str = "127.0.0.1:0", *, nnodes: int, nproc_per_node: int, wait: bool = True, **options):
        """A session whose ranks torchrun starts (on any machine) and that attach to this kernel.

        Opens an authenticated endpoint at `address` ("[HOST:]PORT", loopback unless a host is
        named), prints the command to run on each node, and (with `wait`) returns once all
        `nnodes * nproc_per_node` ranks joined; with `wait=False` it returns at once, CLOSED, and
        `start()` waits. Options: `device`, `backend`, `timeout`, `threads`, `rdzv_endpoint`,
        `key_file`, `join_timeout` (see fsdp_nb/session/attach.py)."""
        from fsdp_nb.session.attach import open_session

        return open_session(cls, address, nnodes, nproc_per_node, wait, options)

    def restart(self) -> Session:
        """Kill the ranks and start fresh ones with the same options. Namespaces are lost.
        Attach mode: the endpoint stays open and prints the command to run again on each node."""
        self._stop()
        self.history.clear()
        return self.start()

    def activate(self) -> Session:
        """Make this the session that the %fsdp_* magics and `current_session()` use; returns it."""
        global _current
        _current = self
        return self

    def __enter__(self) -> Session:
        if self.state == State.CLOSED:
            self.start()  # `with Session(2, start=False) as s:` starts here
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<fsdp_nb.Session {self.config.summary()}, {self.state.value}>"

    # ---- state --------------------------------------------------------------------
    @property
    def _ranks(self) -> list:
        return self._group.ranks if self._group is not None and self.state != State.CLOSED else []

    @property
    def pids(self) -> list[int]:
        return [rk.pid for rk in self._ranks]

    def _check_ready(self) -> None:
        if self.state == State.READY:
            dead = [(rk.rank, rk.exit_reason()) for rk in self._ranks if rk.exit_reason() is not None]
            if dead:
                self._mark_broken("; ".join(f"rank {r} {why}" for r, why in dead))
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
        """One row per rank: host, pid, whether it is alive, and the cell it is running."""
        running = None
        if self.running:
            src, t0 = self.running
            lines = src.strip().splitlines() or [""]
            running = f"{lines[0]}{' ...' if len(lines) > 1 else ''} ({time.monotonic() - t0:.1f} s)"
        return [
            dict(
                rank=rk.rank,
                host=rk.host,
                pid=rk.pid,
                alive=rk.exit_reason() is None,
                process=rk.exit_reason() or "alive",
                state=self.state.value,
                running=running,
            )
            for rk in self._ranks
        ]

    # ---- requests -----------------------------------------------------------------
    def run(
        self,
        source: str,
        *,
        ranks: list[int] | None = None,
        collate: bool | None = None,
        output=None,
        want_result: bool = True,
        record: bool = True,
    ) -> CellResult:
        """Run `source` on every rank (or on `ranks`) and return the CellResult.

        Output streams as it arrives (or collated at the end). Errors do not raise
        here: call `.raise_errors()`, or use `eval`.
        """
        targets = self._targets(ranks)
        cell = next(self._cells)
        out = output if output is not None else printer(collate)
        if record:  # a user's cell: its own progress bar and plot, live unless the output is collated
            self.dashboard.new_cell(live=not isinstance(out, CollatedPrinter))
        try:
            result = self._request({r: P.Execute(0, source, cell, want_result) for r in targets}, out, source)
        finally:
            self.dashboard.finish()  # a silent run too: no widget may outlive the request that made it
        result.by_rank = isinstance(out, CollatedPrinter)  # collated: errors in rank order too
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
            raise SessionError(
                f"cannot send {', '.join(bad) or 'the values'} to the ranks: "
                f"{type(e).__name__}: {e}; send data (tensors, numbers, state dicts) "
                f"and rebuild objects on the ranks"
            ) from None
        self._request({r: P.Push(0, payload) for r in self._targets(None)}, Silent(), None).raise_errors()
        self.history.append(Step(pushed=values))

    def export(self) -> tuple[str, list[str]]:
        """This session's successful cells and pushes as a torchrun script, plus warnings."""
        c = self.config
        nnodes = self.endpoint.nnodes if self.endpoint is not None else 1
        return script(
            self.history,
            nprocs=c.nprocs,
            device=c.device,
            backend=c.backend,
            timeout=c.timeout,
            threads=c.threads,
            nnodes=nnodes,
        )

    def pull(self, name: str, *, ranks: list[int] | None = None) -> list:
        """The value bound to `name` on each rank, as a list indexed by rank."""
        result = self._request({r: P.Pull(0, name) for r in self._targets(ranks)}, Silent(), None)
        missing = [r for r, e in result.errors if e.type == "NameError"]
        if missing:
            raise SessionError(
                f"{rank_list(missing)} {'has' if len(missing) == 1 else 'have'} no variable "
                f"{name!r}; define it in a %%fsdp cell first"
            )
        unpicklable = sorted(r for r in result.dones if result.dones[r].note)
        if unpicklable:
            r = unpicklable[0]
            raise SessionError(f"{name!r} on rank {r} cannot be sent to the notebook: {result.dones[r].note}")
        for r, why in result.raise_errors().load_problems().items():
            raise SessionError(f"{name!r} from rank {r} cannot be rebuilt in the notebook: {why}")
        return result.values

    def layout(self, name: str):
        """The real shard layout of the sharded module `name` on the ranks (see fsdp_nb.session.gather)."""
        from fsdp_nb.session.gather import layout

        return layout(self, name)

    def memory(self, name: str, optimizer: str | None = None) -> list:
        """Real per-rank bytes of `name`'s parameters, gradients and `optimizer` state."""
        from fsdp_nb.session.gather import memory

        return memory(self, name, optimizer)

    def trace(self, name: str, *, steps: int = 1, model: str | None = None, label: str | None = None):
        """Trace `steps` training steps of the Trainer `name` on the ranks (or of a step function, with
        `model=` the name of its sharded model); returns the `fsdp_nb.trace.Trace` of every rank."""
        from fsdp_nb.session.gather import trace

        return trace(self, name, steps=steps, model=model, label=label)

    def interrupt(self) -> None:
        """Raise KeyboardInterrupt in the code running on every rank (idle ranks ignore it)."""
        for rk in self._ranks:
            rk.interrupt()

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
            result = Exchange(
                self._ranks,
                msgs,
                out,
                request_id=next(self._ids),
                handlers=self.event_handlers,
                stuck_after_s=self.config.timeout + self.STUCK_MARGIN_S,
                interrupt_grace_s=self.INTERRUPT_GRACE_S,
            ).run()
            if not result.ok:
                self.last_error = RankError(result)
            if result.broken:
                self._mark_broken(result.broken)
            elif self.state == State.BUSY:
                self.state = State.READY
            return result
        finally:
            self.running = None
            self._lock.release()


_current: Session | None = None  # the notebook's session: the one the magics drive
_open_sessions: weakref.WeakSet[Session] = weakref.WeakSet()


@atexit.register  # registered after the launcher's kill-at-exit hook, so it runs before it
def _close_at_exit() -> None:
    """A clean kernel exit closes each session as %fsdp_shutdown would: a save still being written
    finishes first (up to its bound), where a kill would leave it incomplete."""
    for s in list(_open_sessions):
        try:
            s.close()
        except Exception:
            pass


def current_session() -> Session:
    """The session the %fsdp_* magics use (made by `%fsdp_launch` or bound by `Session.activate()`)."""
    if _current is None:
        raise SessionError("no fsdp_nb session yet: run %fsdp_launch -n 2 (or Session(2).activate() in Python)")
    return _current


def _picklable(v) -> bool:
    try:
        pickle.dumps(v)
        return True
    except Exception:
        return False
