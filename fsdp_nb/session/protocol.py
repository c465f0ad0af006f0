"""Messages exchanged between the kernel and the ranks over one duplex pipe per rank.

Kernel -> rank: Execute, Push, Pull, Shutdown.
Rank -> kernel: Ready (once, after init_process_group), then for each request any
number of Stream / Display / Event messages followed by exactly one Done. After
Shutdown, a rank with background work sends Finishing before its Done.

Attach mode (ranks started by torchrun on other machines, docs in fsdp_nb/session/attach.py)
opens two authenticated connections per rank: on each the rank first sends Hello and the
kernel answers Welcome or Refused; the data connection then carries the messages above,
the control connection Heartbeat both ways and Interrupt from the kernel.

Everything here is a plain slotted dataclass so that pickling a message costs a few
microseconds: a trivial cell is two small messages per rank, and the round trip
budget is one millisecond.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


# ---- kernel -> rank -------------------------------------------------------------
@dataclass(slots=True)
class Execute:
    """Run `source` in the rank's namespace; `cell` numbers the cell in this session."""

    id: int
    source: str
    cell: int
    want_result: bool = True


@dataclass(slots=True)
class Push:
    """Bind names in the rank's namespace; `payload` is pickle.dumps(dict) made once in the kernel."""

    id: int
    payload: bytes


@dataclass(slots=True)
class Pull:
    """Send back the value bound to `name` in the rank's namespace."""

    id: int
    name: str


@dataclass(slots=True)
class Shutdown:
    """Leave the process group cleanly and exit."""

    id: int = 0


ABANDONED_EXIT = 75  # a rank's exit code when its background work did not finish before the bound
# Set in the fork server's environment only: fsdp_nb.rank.preload checks that the server can fork safely.
FORKSERVER_MARK = "FSDP_NB_FORKSERVER_PRELOAD"


# ---- rank -> kernel -------------------------------------------------------------
@dataclass(slots=True)
class Ready:
    rank: int
    pid: int
    torch_version: str
    backend: str
    device: str


@dataclass(slots=True)
class StartFailed:
    """The rank could not join the process group (bad device, rendezvous failure...)."""

    rank: int
    error: str


@dataclass(slots=True)
class Finishing:
    """After Shutdown: the rank first finishes `what` (an async checkpoint), for up to `timeout` seconds."""

    rank: int
    what: str
    timeout: float


@dataclass(slots=True)
class Stream:
    id: int
    rank: int
    name: str  # "stdout" | "stderr"
    text: str


@dataclass(slots=True)
class Display:
    """A rich object shown on a rank: a MIME bundle such as {'image/png': b64, 'text/plain': ...}."""

    id: int
    rank: int
    data: dict
    metadata: dict = field(default_factory=dict)


@dataclass(slots=True)
class Event:
    """A structured event from fsdp_nb.events.emit (progress, metrics...)."""

    id: int
    rank: int
    kind: str
    payload: dict


@dataclass(slots=True)
class RemoteError:
    """An exception raised on a rank, with its traceback already formatted there.

    Only the rank holds the exception object, so the rank also decides whether fsdp_nb
    recognises it, and fills `short` (see [Note: short errors] in fsdp_nb/rank/errors.py).
    """

    type: str
    message: str  # the first line of the message
    traceback: str  # the user-facing part: frames of the cell and below, whole (what %fsdp_tb shows)
    timeout: bool = False  # raised by a collective that timed out (the rank was stuck)
    # The lines shown under the header instead of the traceback, unwrapped, when fsdp_nb recognises
    # the error: the user's line that raised, torch's error it re-worded, its explanation. Empty: the
    # error is shown whole.
    short: tuple[str, ...] = ()

    def headline(self) -> str:
        return f"{self.type}: {self.message}" if self.message else self.type


@dataclass(slots=True)
class Done:
    """The end of one request on one rank.

    `value` is pickle.dumps(result) or None; when the result could not be pickled,
    `value_repr` holds its repr and `note` says why.
    """

    id: int
    rank: int
    error: RemoteError | None = None
    value: bytes | None = None
    value_repr: str | None = None
    note: str | None = None
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def has_value(done: Done) -> bool:
    return done.value is not None or done.value_repr is not None


def unpickled(done: Done) -> Any:
    import pickle

    return pickle.loads(done.value) if done.value is not None else None


# ---- attach mode: a rank that torchrun started joins a listening kernel ----------
@dataclass(slots=True)
class Hello:
    """The first message on each of an attached rank's two connections (`role` "data" or "control")."""

    role: str
    rank: int
    world_size: int
    host: str
    pid: int
    fsdp_nb_version: str
    torch_version: str
    token: str = ""  # control: the token the kernel's Welcome gave this rank's data connection


@dataclass(slots=True)
class Welcome:
    """The kernel accepts a connection; `options` (data connection only): backend, device, timeout, threads."""

    token: str
    options: dict = field(default_factory=dict)


@dataclass(slots=True)
class Refused:
    """The kernel refuses a rank; `reason` is one line that says what to do. The rank prints it and exits 1."""

    reason: str


@dataclass(slots=True)
class Heartbeat:
    """Sent every second both ways on the control connection: silence means the peer is gone."""


@dataclass(slots=True)
class Interrupt:
    """Kernel -> rank on the control connection: raise KeyboardInterrupt in the cell being run, if any."""
