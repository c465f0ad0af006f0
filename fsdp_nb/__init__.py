"""fsdp_nb: learn, inspect and run PyTorch FSDP (FSDP1 and FSDP2) from Jupyter.

In a notebook: `%load_ext fsdp_nb`, then `%fsdp_launch -n 2` and `%%fsdp` cells.
In plain Python: `Session`, `shard`, `Trainer`, `FSDPConfig`.

Imports are lazy: ranks import `fsdp_nb.rank.worker` at spawn, and should not pay for
matplotlib, IPython or torch.distributed until they use them.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Session": "fsdp_nb.session.session",
    "SessionError": "fsdp_nb.session.launcher",
    "State": "fsdp_nb.session.session",
    "SessionConfig": "fsdp_nb.session.options",
    "CellResult": "fsdp_nb.session.results",
    "RankError": "fsdp_nb.session.results",
    "emit": "fsdp_nb.rank.events",
    "FSDPConfig": "fsdp_nb.config",
    "MixedPrecision": "fsdp_nb.precision",
    "shard": "fsdp_nb.sharding",
    "check_optimizer": "fsdp_nb.optim_guard",
    "Trainer": "fsdp_nb.train",
    "TrainConfig": "fsdp_nb.train",
    "GPT": "fsdp_nb.models",
    "GPTConfig": "fsdp_nb.models",
    "Layer": "fsdp_nb.models",
}

__all__ = sorted(_LAZY) + ["load_ipython_extension", "unload_ipython_extension"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fsdp_nb' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def load_ipython_extension(ipython) -> None:
    """`%load_ext fsdp_nb`: register the %fsdp_* magics."""
    from fsdp_nb.session.magics import load

    load(ipython)


def unload_ipython_extension(ipython) -> None:
    from fsdp_nb.session.magics import unload

    unload(ipython)
