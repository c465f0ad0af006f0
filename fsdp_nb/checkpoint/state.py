"""Model and optimizer state in the one shape both FSDP versions share: the model's own names.

`torch.distributed.checkpoint.state_dict` gives FSDP1 and FSDP2 state dicts keyed by
the model's parameter names (no `_fsdp_wrapped_module`, no `_flat_param`), with the
optimizer state keyed the same way. That is what makes a checkpoint of one version
load into the other, at any world size.

Traps of torch 2.13 on CPU that this module steers around (each reproduced):
- FSDP1's `offload_to_cpu` / `cpu_offload` full-state paths raise (use_orig_params=False),
  segfault (use_orig_params=True), or silently return `exp_avg_sq` as `exp_avg`
  (its optimizer state) on CPU: there FSDP1 full state is gathered with
  `rank0_only=True, offload_to_cpu=False` (on CUDA, with the offload).
- `set_state_dict(..., broadcast_from_rank0=True)` with `{}` on the other ranks skips
  the model broadcast there and hangs rank 0: model and optimizer are set separately.
- `set_model_state_dict` replaces the values of the dict it is given: it gets a copy.

Every call into torch's state-dict helpers runs under `quiet()`: FSDP1's deprecation
chatter stays inside our calls instead of flooding the cell's output.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from fsdp_nb._torch import is_sharded_tensor, sharded_tensor_like
from fsdp_nb.checkpoint.quiet import quiet
from fsdp_nb.sharding import compute_device, fsdp_version_of


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """`{"model": ..., "optim": ...}` of this rank's shards: DTensors (FSDP2, and FSDP1's hybrid
    sharding, which gets a 2-D `device_mesh`) or ShardedTensors (FSDP1 otherwise).

    With an optimizer that has not stepped yet, torch creates its (zero) state first,
    so the dict has a slot for every tensor a checkpoint may hold.
    """
    with quiet():
        if optimizer is None:
            return {"model": get_model_state_dict(model)}
        model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict | None:
    """The whole state gathered on rank 0 (a collective); None on the other ranks."""
    rank, _ = rank_and_world()
    with quiet():
        state = _full_state(model, optimizer)
    return state if rank == 0 else None


def _full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    if fsdp_version_of(model) == 1:
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        # On CUDA the gathered state goes to CPU memory as it is gathered, or rank 0 would hold the
        # whole model and optimizer on its GPU. On CPU, where it is already, torch's offload path
        # breaks (see the module's notes), so it is used on CUDA only.
        offload = compute_device().type != "cpu" if dist.is_initialized() else False
        with FSDP.state_dict_type(
            model,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=offload, rank0_only=True),
            FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=True),
        ):
            state = {"model": model.state_dict()}
            if optimizer is not None:
                state["optim"] = FSDP.optim_state_dict(model, optimizer)
    else:  # FSDP2, or a plain module in one process
        options = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
        state = {"model": get_model_state_dict(model, options=options)}
        if optimizer is not None:
            state["optim"] = get_optimizer_state_dict(model, optimizer, options=options)
    return state


def shapes(model_state: dict) -> dict[str, tuple[int, ...]]:
    """Global shape of every entry of a model state dict (a shard reports its whole tensor's shape)."""
    out = {}
    for key, value in model_state.items():
        if is_sharded_tensor(value):  # FSDP1's ShardedTensor: its .shape warns
            out[key] = tuple(value.metadata().size)
        elif isinstance(value, DTensor) or torch.is_tensor(value):
            out[key] = tuple(value.shape)
    return out


def mismatch(saved: dict[str, tuple], wanted: dict[str, tuple], limit: int = 3) -> str | None:
    """What differs between a checkpoint's model and the model it is loaded into, in one line; None if nothing."""
    missing = [k for k in wanted if k not in saved]
    extra = [k for k in saved if k not in wanted]
    reshaped = [k for k in wanted if k in saved and tuple(saved[k]) != tuple(wanted[k])]
    if not (missing or extra or reshaped):
        return None
    parts = []
    if missing:
        parts.append(f"not in the checkpoint: {', '.join(missing[:limit])}{' ...' if len(missing) > limit else ''}")
    if extra:
        parts.append(f"not in the model: {', '.join(extra[:limit])}{' ...' if len(extra) > limit else ''}")
    for k in reshaped[:limit]:
        parts.append(f"{k} is {tuple(saved[k])} in the checkpoint but {tuple(wanted[k])} in the model")
    return f"{len(missing) + len(extra) + len(reshaped)} keys differ: " + "; ".join(parts)


def clone_local(obj):
    """A copy of this rank's shards in CPU memory, structure kept, for a background write while
    training goes on. On CUDA the copy leaves the GPU: holding a second copy of the parameters and
    AdamW state there for the whole write would cost as much GPU memory as the state itself.

    FSDP1's ShardedTensor has no `data_ptr`, which is why `dcp.async_save` refuses it;
    rebuilding it around copied local tensors works. A DTensor's `.to("cpu")` is a DTensor
    whose local tensor is in CPU memory, as torch's own async staging makes it; its mesh
    stays the GPU's, so the write knows each shard's place.
    """
    if isinstance(obj, dict):
        return {k: clone_local(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clone_local(v) for v in obj]
    if isinstance(obj, DTensor):
        copy = obj.detach().to("cpu", copy=True)  # still a DTensor, over the same mesh and placements
        if copy.to_local().data_ptr() == obj.to_local().data_ptr():  # pragma: no cover - a copy is a copy
            raise RuntimeError("clone_local: a DTensor's copy shares its storage")
        return copy
    if is_sharded_tensor(obj):
        if all(s.tensor.device.type == "cpu" for s in obj.local_shards()):
            return sharded_tensor_like(obj, [s.tensor.detach().to("cpu", copy=True) for s in obj.local_shards()])
        return obj.cpu()  # a copy on CPU, its metadata moved there too
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    return obj


def load_sharded_into(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict) -> None:
    """Set model (and optimizer) from a `sharded_state` dict that DCP has filled."""
    with quiet():
        if optimizer is None:
            set_model_state_dict(model, state["model"])
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_full_into(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict | None) -> None:
    """Set model (and optimizer) from a full state that only rank 0 holds; the others pass None."""
    with quiet():
        _load_full_into(model, optimizer, state)


def _load_full_into(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict | None) -> None:
    if not dist.is_initialized():
        set_model_state_dict(model, dict(state["model"]), options=StateDictOptions(full_state_dict=True))
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, state["optim"], options=StateDictOptions(full_state_dict=True))
        return
    # strict=False: FSDP1 with use_orig_params=False leaves a tied parameter's second name out of what
    # ranks != 0 expect (it is the first name's storage); load_checkpoint compared every name beforehand.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    # Two calls, not set_state_dict: with {} on ranks != 0 it skips their model broadcast and rank 0 hangs.
    set_model_state_dict(model, dict(state["model"]) if state else {}, options=options)  # a copy: it is mutated
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"] if state else {}, options=options)
