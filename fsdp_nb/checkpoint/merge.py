"""`merge_weights`: a checkpoint's model weights as one file that a plain, unsharded model loads.

Runs in one process, with no process group: DCP reads every shard of every
parameter from the checkpoint's files and joins them. Only the model is read, never
the optimizer state, so the memory needed is one copy of the weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fsdp_nb.checkpoint import store
from fsdp_nb.checkpoint.store import CheckpointError

SAFE_NAME, TORCH_NAME = "model.safetensors", "pytorch_model.bin"  # Accelerate's file names


def merge_weights(checkpoint_dir: str | os.PathLike, output_path: str | os.PathLike, *,
                  safe_serialization: bool = True) -> Path:  # fmt: skip
    """Write the model weights of `checkpoint_dir` to `output_path/model.safetensors`.

    With `safe_serialization=False` the file is `output_path/pytorch_model.bin`, a
    `torch.save`d state dict. Either loads with `model.load_state_dict(...)` into the
    plain model. Returns the file written. Raises CheckpointError (one line) for a
    missing path, a directory that is not a checkpoint, or one that holds several.
    """
    manifest = store.inspect(checkpoint_dir)
    weights = _read_model(manifest)
    out_dir = Path(output_path)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"output path {out_dir} is a file; give a directory to write {SAFE_NAME} into")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / (SAFE_NAME if safe_serialization else TORCH_NAME)
    tmp = target.with_name(f".{target.name}.tmp")
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(_unshared(weights), str(tmp), metadata={"format": "pt"})
    else:
        torch.save(weights, tmp)
    tmp.replace(target)
    return target


def _read_model(manifest: store.Manifest) -> dict[str, torch.Tensor]:
    if manifest.state_dict_type == "FULL_STATE_DICT":
        full = torch.load(manifest.path / store.FULL_FILE, map_location="cpu", weights_only=True)
        return dict(full["model"])
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    try:
        loaded = _load_state_dict_from_keys({f"model.{k}" for k in manifest.model}, checkpoint_id=str(manifest.path))
    except BaseException as e:  # CheckpointException is a BaseException
        raise CheckpointError(f"reading checkpoint {manifest.path} failed: {type(e).__name__}: {e}") from None
    model = loaded["model"]
    return {k: model[k] for k in manifest.model}  # the model's own order


def _unshared(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): give each its own."""
    seen, out = set(), {}
    for key, tensor in weights.items():
        tensor = tensor.contiguous()
        ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[key] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out
