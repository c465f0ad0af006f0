"""SessionError: what the kernel side raises when the session's state does not allow an operation."""

from __future__ import annotations


class SessionError(RuntimeError):
    """An operation that the session's state does not allow; the message says what to do, in one line."""
