"""Structured events from ranks: progress and metrics.

Rank side: `emit("progress", step=3, total=10, desc="train")` or
`emit("metrics", step=3, loss=2.1)`. Inside a session the worker installs a
sink that forwards each event over the rank's pipe to the kernel, where it
becomes a progress bar and a live plot. Outside a session (a script, torchrun)
there is no sink and `emit` returns False, so callers can print instead.

Event kinds the kernel understands:
- "progress": step (int), total (int), desc (str, optional)
- "metrics":  step (int) plus any float scalars (loss, tokens_per_s, mem_mb...)
Any other kind is recorded on the cell's result and otherwise ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_sink: Callable[[str, dict], None] | None = None


def set_sink(sink: Callable[[str, dict], None] | None) -> None:
    """Install the function that carries events away (the worker does this)."""
    global _sink
    _sink = sink


def in_session() -> bool:
    """True on a rank of an fsdp_nb session, where events reach the notebook."""
    return _sink is not None


def emit(kind: str, **payload: Any) -> bool:
    """Send one event to the notebook. Returns False when no session listens."""
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"emit: kind={kind!r} must be a non-empty string, e.g. 'progress' or 'metrics'")
    if _sink is None:
        return False
    _sink(kind, payload)
    return True
