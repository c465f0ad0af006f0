"""`fsdp_nb.events`: the public path of `emit()`, whose home is `fsdp_nb.rank.events`."""

from __future__ import annotations

from fsdp_nb.rank.events import emit, in_session

__all__ = ["emit", "in_session"]
