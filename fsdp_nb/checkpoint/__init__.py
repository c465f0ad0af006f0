"""Checkpoints that work across FSDP versions and world sizes, written atomically.

- `save_checkpoint(model, optimizer, path, *, state_dict_type=None, async_save=False)`
- `load_checkpoint(model, optimizer, path, *, verify=True)`
- `merge_weights(checkpoint_dir, output_path, *, safe_serialization=True, verify=True)`
- `verify(path)`: every file present, whole, and byte for byte as saved (`fsdp-nb verify`)
- `quiet()`: torch's deprecation chatter about FSDP1's state dicts hidden inside a `with` block, for
  a cell that calls torch's state-dict helpers itself (fsdp_nb's own calls already are)

`store` is the directory format, `state` the state dicts of both FSDP versions,
`save` / `load` / `merge` the three operations, `quiet` torch's warnings during them.
"""

from __future__ import annotations

from fsdp_nb.checkpoint.load import load_checkpoint, resolve
from fsdp_nb.checkpoint.merge import merge_weights
from fsdp_nb.checkpoint.quiet import quiet
from fsdp_nb.checkpoint.save import AsyncCheckpoint, save_checkpoint, wait_pending
from fsdp_nb.checkpoint.store import CheckpointError, Manifest, checkpoints_in, inspect, latest, verify

__all__ = [
    "AsyncCheckpoint",
    "CheckpointError",
    "Manifest",
    "checkpoints_in",
    "inspect",
    "latest",
    "load_checkpoint",
    "merge_weights",
    "quiet",
    "resolve",
    "save_checkpoint",
    "verify",
    "wait_pending",
]
