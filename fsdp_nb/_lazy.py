"""Lazy exports for package faces: a name's module is imported when the name is first used.

Ranks import `fsdp_nb.rank.worker` at spawn and the kernel loads the magics at
`%load_ext`; neither should pay for torch, matplotlib or IPython before it uses
them. `dir()`, completion and `from pkg import name` see the lazy names as usual.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, names: Mapping[str, str], eager: dict) -> tuple[Callable, Callable]:
    """`(__getattr__, __dir__)` for `package`, whose `names` map each public name to its module.

    `eager` is the package's globals(): a resolved name is cached there, so the
    lookup runs once.
    """

    def __getattr__(name: str):
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        eager[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(eager.get("__all__", ())) | set(names))

    return __getattr__, __dir__
