"""Background work that a process must finish before it exits: a checkpoint being written.

An async checkpoint is written by a thread while training goes on. Every way a rank
can end, `%fsdp_shutdown`, `%fsdp_restart`, the kernel exiting or dying, and a
torchrun script reaching its last line, first waits here for that thread, up to
`FINISH_TIMEOUT_S`, so a save the user started is never silently dropped. After the
timeout the process exits anyway (no orphans), and the caller says which work was
abandoned; the checkpoint it was writing stays incomplete and never loads.

The library registers its work here (`add` / `discard`); the rank's worker and an
`atexit` hook (for scripts) call `finish`. Pure threading: no torch.
"""

from __future__ import annotations

import atexit
import threading
import time
from typing import Protocol

FINISH_TIMEOUT_S = 120.0


class Work(Protocol):
    what: str  # "checkpoint /path/step-000012", for the one line the user reads

    def done(self) -> bool: ...

    def join(self, timeout: float | None) -> None: ...


_lock = threading.Lock()
_work: list[Work] = []


def add(work: Work) -> None:
    with _lock:
        _work.append(work)


def discard(work: Work) -> None:
    with _lock:
        if work in _work:
            _work.remove(work)


def pending() -> list[str]:
    """What is still running, one description each."""
    with _lock:
        return [w.what for w in _work if not w.done()]


def finish(timeout: float | None = None) -> list[str]:
    """Wait for every piece of pending work, `timeout` seconds in all (default `FINISH_TIMEOUT_S`, read
    now); returns what is still unfinished."""
    deadline = time.monotonic() + (FINISH_TIMEOUT_S if timeout is None else timeout)
    with _lock:
        work = list(_work)
    for w in work:
        w.join(max(0.0, deadline - time.monotonic()))
    return [w.what for w in work if not w.done()]


@atexit.register
def _finish_at_exit() -> None:
    """A script (torchrun) that ends right after an async save: the write finishes before the process ends."""
    left = pending()
    if left:
        import sys

        print(f"fsdp_nb: waiting up to {FINISH_TIMEOUT_S:.0f} s for {'; '.join(left)} to finish", file=sys.stderr)
        unfinished = finish()
        if unfinished:
            print(f"fsdp_nb: abandoned {'; '.join(unfinished)}: still writing after {FINISH_TIMEOUT_S:.0f} s; "
                  "it stays incomplete and never loads", file=sys.stderr)  # fmt: skip
