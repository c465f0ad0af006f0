"""The kernel side: the Session, its magics, and everything that talks to the ranks.

Imports are lazy: ranks import `fsdp_nb.session.protocol`, the one module both
sides share, and must not pull in the kernel machinery with it.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "Session": "fsdp_nb.session.session",
    "State": "fsdp_nb.session.session",
    "SessionError": "fsdp_nb.session.launcher",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fsdp_nb.session' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
