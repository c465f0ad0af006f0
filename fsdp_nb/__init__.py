"""fsdp_nb: learn, inspect and run PyTorch FSDP (FSDP1 and FSDP2) from Jupyter.

In a notebook: `%load_ext fsdp_nb`, then `%fsdp_launch -n 2` and `%%fsdp` cells;
`fsdp_nb.current_session()` hands back the session the magics drive.
In plain Python: `Session`, `shard`, `Trainer`, `FSDPConfig`.

Imports are lazy: ranks import `fsdp_nb.rank.worker` at spawn, and should not pay
for matplotlib, IPython or torch.distributed until they use them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fsdp_nb._lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "Session": "fsdp_nb.session.session",
    "State": "fsdp_nb.session.session",
    "current_session": "fsdp_nb.session.session",
    "SessionError": "fsdp_nb.session.errors",
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
    "save_checkpoint": "fsdp_nb.checkpoint",
    "load_checkpoint": "fsdp_nb.checkpoint",
    "merge_weights": "fsdp_nb.checkpoint",
    "CheckpointError": "fsdp_nb.checkpoint",
    "trace_step": "fsdp_nb.trace",
    "Trace": "fsdp_nb.trace",
}

__all__ = [
    "CellResult",
    "CheckpointError",
    "FSDPConfig",
    "GPT",
    "GPTConfig",
    "Layer",
    "MixedPrecision",
    "RankError",
    "Session",
    "SessionConfig",
    "SessionError",
    "State",
    "Trace",
    "TrainConfig",
    "Trainer",
    "check_optimizer",
    "current_session",
    "emit",
    "load_checkpoint",
    "merge_weights",
    "save_checkpoint",
    "shard",
    "trace_step",
    "load_ipython_extension",
    "unload_ipython_extension",
]
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each name loads on first use
    from fsdp_nb.checkpoint import CheckpointError, load_checkpoint, merge_weights, save_checkpoint
    from fsdp_nb.config import FSDPConfig
    from fsdp_nb.models import GPT, GPTConfig, Layer
    from fsdp_nb.optim_guard import check_optimizer
    from fsdp_nb.precision import MixedPrecision
    from fsdp_nb.rank.events import emit
    from fsdp_nb.session.errors import SessionError
    from fsdp_nb.session.options import SessionConfig
    from fsdp_nb.session.results import CellResult, RankError
    from fsdp_nb.session.session import Session, State, current_session
    from fsdp_nb.sharding import shard
    from fsdp_nb.trace import Trace, trace_step
    from fsdp_nb.train import TrainConfig, Trainer


def load_ipython_extension(ipython) -> None:
    """`%load_ext fsdp_nb`: register the %fsdp_* magics."""
    from fsdp_nb.session.magics import load

    load(ipython)


def unload_ipython_extension(ipython) -> None:
    from fsdp_nb.session.magics import unload

    unload(ipython)
