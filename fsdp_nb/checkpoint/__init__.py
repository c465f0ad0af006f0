"""Checkpoints that work across FSDP versions and world sizes, written atomically.

- `save_checkpoint(model, optimizer, path, *, state_dict_type=None, async_save=False)`
- `load_checkpoint(model, optimizer, path)`
- `merge_weights(checkpoint_dir, output_path, *, safe_serialization=True)`

`store` is the directory format, `state` the state dicts of both FSDP versions,
`save` / `load` / `merge` the three operations.
"""

from __future__ import annotations

import warnings

from fsdp_nb.checkpoint.load import load_checkpoint, resolve
from fsdp_nb.checkpoint.merge import merge_weights
from fsdp_nb.checkpoint.save import AsyncCheckpoint, save_checkpoint, wait_pending
from fsdp_nb.checkpoint.store import CheckpointError, Manifest, checkpoints_in, inspect, latest

# FSDP1's sharded state dicts are ShardedTensors, which torch 2.13 marks deprecated on every
# touch; its state-dict helpers also warn about gloo groups with a CPU and a CUDA backend, and
# about a private helper they call themselves. That is torch talking to itself: a save would
# print dozens of lines, with paths into site-packages, that the user can do nothing about.
warnings.filterwarnings("ignore", message="Please use DTensor instead and we are deprecating ShardedTensor")
warnings.filterwarnings("ignore", message="Multiple backends are registered with this ProcessGroup")
warnings.filterwarnings("ignore", message="`_get_pg_default_device` will be deprecated")
# In one process (merge_weights, a plain model) DCP says at every call that it runs without ranks.
warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")

__all__ = [
    "AsyncCheckpoint",
    "CheckpointError",
    "Manifest",
    "checkpoints_in",
    "inspect",
    "latest",
    "load_checkpoint",
    "merge_weights",
    "resolve",
    "save_checkpoint",
    "wait_pending",
]
