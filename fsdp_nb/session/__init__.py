"""The kernel side: the Session, its magics, and everything that talks to the ranks.

Imports are lazy: ranks import `fsdp_nb.session.protocol`, the one module both
sides share, and must not pull in the kernel machinery with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fsdp_nb._lazy import lazy_exports

_LAZY = {
    "Session": "fsdp_nb.session.session",
    "State": "fsdp_nb.session.session",
    "current_session": "fsdp_nb.session.session",
    "SessionError": "fsdp_nb.session.errors",
}
__all__ = ["Session", "SessionError", "State", "current_session"]
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

if TYPE_CHECKING:
    from fsdp_nb.session.errors import SessionError
    from fsdp_nb.session.session import Session, State, current_session
