"""`save_adapter`: a sharded PEFT model's adapter in PEFT's own format, for `PeftModel.from_pretrained`.

The order, and why:
1. every rank checks that the model is a PEFT model (the same answer on every rank);
2. the trainable tensors are gathered in full (a collective), by torch's
   `get_model_state_dict(..., ignore_frozen_params=True)`: an adapter is megabytes, the
   frozen base it sits on may be gigabytes. FSDP2 drops the frozen tensors before it
   gathers; FSDP1 gathers its FlatParameters whole, unit by unit, and drops them after;
3. rank 0 writes them with PEFT's own `save_pretrained(..., state_dict=...)`, which turns
   the model's names (`...q_proj.lora_A.default.weight`) into PEFT's file keys, on a
   replica of the model on the meta device (see `_write`), into a temporary directory;
   then renames the files into place, `adapter_config.json` last. The ranks agree on how
   that went [Note: fail together], which is also the barrier that ends the call.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.distributed as dist
from torch import nn

from fsdp_nb.checkpoint.quiet import quiet
from fsdp_nb.hf import export
from fsdp_nb.hf.detect import peft_model_of
from fsdp_nb.phases import fail_together
from fsdp_nb.sharding import compute_device, fsdp_version_of

PHASE = "save_adapter"
ADAPTER_CONFIG = "adapter_config.json"


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the active adapter of `model` (a PEFT model, sharded by FSDP1 or FSDP2, or not) to the
    directory `path`: `adapter_config.json` and `adapter_model.safetensors`, as PEFT writes them.

    Call it on every rank: it gathers the trainable tensors (a collective) and rank 0 writes.
    `PeftModel.from_pretrained(base_model, path)` loads the result. A model that is not a PEFT
    model, or a path that is a file, raises on every rank. Returns `path`.
    """
    path = Path(path).absolute()
    rank = dist.get_rank() if dist.is_initialized() else 0
    with fail_together(PHASE):
        if peft_model_of(model) is None:
            raise ValueError(f"save_adapter: {type(model).__name__} is not a PEFT model; save a whole model with "
                             "save_checkpoint and merge_weights")  # fmt: skip
        if rank == 0 and path.exists() and not path.is_dir():
            raise FileExistsError(f"save_adapter: {path} is a file; give a directory to write the adapter into")
    state = trainable_state(model)
    with fail_together(PHASE):
        if rank == 0:
            _write(export.record(model), state, path)
    return path


def trainable_state(model: nn.Module) -> dict:
    """The trainable tensors of `model` in full, by the model's own names (a collective on every rank).

    On CPU, FSDP1's offloading full-state path is broken (see fsdp_nb.checkpoint.state): there
    every rank gathers without it, which for an adapter's few tensors costs nothing worth saving.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    offload = dist.is_initialized() and not (fsdp_version_of(model) == 1 and compute_device().type == "cpu")
    options = StateDictOptions(full_state_dict=True, cpu_offload=offload, ignore_frozen_params=True)
    with quiet():
        return get_model_state_dict(model, options=options)


def _write(rec: dict, state: dict, path: Path) -> None:
    """Rank 0: PEFT's own files for the active adapters, published whole.

    PEFT finds an adapter's tensors by walking the model's modules, whose names under FSDP1
    (`_fsdp_wrapped_module`) or activation checkpointing are not the state dict's; so its
    `save_pretrained` runs on a replica on the meta device, named as the state dict is."""
    if not state:
        raise ValueError("save_adapter: the model has no trainable tensors; an adapter to save is a trainable one")
    replica = export.meta_peft(export.meta_model(export.config_from_record(rec)), rec)
    tmp = export.temporary_dir(path)
    try:
        replica.save_pretrained(str(tmp), state_dict=state, selected_adapters=list(replica.active_adapters))
        export.publish_files(tmp, path, last=ADAPTER_CONFIG)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless the write failed
