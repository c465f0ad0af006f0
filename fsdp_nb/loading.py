"""`cpu_ram_efficient_loading`: rank 0 holds the real weights, the other ranks never hold the whole model.

    model = build_on_rank0(lambda: GPT(config), fsdp)   # real on rank 0, meta (no memory) elsewhere
    model = shard(model, fsdp)                          # shards filled by broadcast from rank 0

The order inside `shard()`, and why:
1. rank 0 keeps a reference to its full state dict before sharding replaces the
   parameters;
2. the other ranks get storage for their shards only: FSDP2 shards the meta model
   and `to_empty` allocates the local shards; FSDP1 allocates one unit at a time,
   through a `param_init_fn` that keeps tied parameters tied, just before it
   flattens and shards that unit;
3. rank 0's tensors are broadcast one by one and each rank keeps its own slice:
   FSDP2 through `set_model_state_dict(..., broadcast_from_rank0=True)`; FSDP1 by
   copying each parameter's slice straight into the local FlatParameter shard, at
   the offsets torch recorded (`_shard_param_infos`), because FSDP1's full-state
   load unshards every FlatParameter first, which costs the whole model again;
4. buffers that are not in the state dict (non-persistent) are broadcast too:
   `to_empty` left them uninitialised.
`reset_parameters()` is never called on the empty shards: on CPU, DTensor has no
RNG of its own, so every rank would draw the same "random" shard.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn


def build_on_rank0(factory: Callable[[], nn.Module], config) -> nn.Module:
    """`factory()` on rank 0; with `cpu_ram_efficient_loading` the other ranks build
    it on the meta device (shapes, no memory) and `shard()` fills them from rank 0."""
    if config.cpu_ram_efficient_loading and dist.get_rank() != 0:
        with torch.device("meta"):
            return factory()
    return factory()


def has_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def rank0_state(model: nn.Module) -> dict | None:
    """Rank 0's full state dict, taken before sharding replaces its parameters; None elsewhere."""
    return model.state_dict() if dist.get_rank() == 0 else None


def broadcast_from_rank0(model: nn.Module) -> None:
    """Overwrite every parameter and buffer with rank 0's values (works on gloo/CPU)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate (uninitialised) storage for meta tensors, keeping tied parameters tied:
    `to_empty` gives each owner of a shared parameter its own new tensor."""
    owners: dict[int, list[tuple[str, str]]] = {}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((module_name, name))
    model.to_empty(device=device)
    for (first_module, first_name), *others in (o for o in owners.values() if len(o) > 1):
        shared = getattr(model.get_submodule(first_module), first_name)
        for module_name, name in others:
            setattr(model.get_submodule(module_name), name, shared)


def tie_keeping_init(device: torch.device) -> Callable[[nn.Module], None]:
    """FSDP1's `param_init_fn`: empty storage for one module's meta tensors, one new tensor per
    shared parameter, so a tie (embedding and head) is still one parameter when FSDP flattens it."""
    made: dict[int, nn.Parameter] = {}

    def init(module: nn.Module) -> None:
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                module._parameters[name] = made[id(p)]
        for name, b in list(module.named_buffers(recurse=False)):
            if b.is_meta:
                module._buffers[name] = torch.empty_like(b, device=device)

    return init


def fill_fsdp1_from_rank0(model: nn.Module, full_state: dict | None) -> None:
    """FSDP1: every rank receives rank 0's parameters one at a time and keeps the elements of its shard."""
    from fsdp_nb.layout.inspect import flat_handles, prefixed

    rank = dist.get_rank()
    flattened = set()
    with torch.no_grad():
        for prefix, handle in flat_handles(model).items():
            flat = handle.flat_param  # (local shard numel,): this rank's chunk of the padded flat tensor
            for fqn, shape, info in zip(flat._fqns, flat._shapes, flat._shard_param_infos):
                name = prefixed(prefix, fqn)
                flattened.add(name)
                device = flat.device  # nccl moves only tensors on the rank's GPU
                if rank == 0:
                    full = full_state[name].to(device=device, dtype=flat.dtype)
                else:
                    full = torch.empty(shape, dtype=flat.dtype, device=device)
                dist.broadcast(full, src=0)
                if info.in_shard:  # elements [start, end] of the parameter sit at offset_in_shard of this shard
                    start, end = info.intra_param_start_idx, info.intra_param_end_idx
                    piece = full.reshape(-1)[start : end + 1]
                    flat.data[info.offset_in_shard : info.offset_in_shard + piece.numel()].copy_(piece)
        # what FSDP1 does not flatten (ignored modules) and every buffer: whole, from rank 0
        rest = [t for n, t in model.named_parameters() if _clean(n) not in flattened and not _is_flat(n)]
        for tensor in rest + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)


def _is_flat(name: str) -> bool:
    return name.endswith("_flat_param") or "._flat_param" in name


def fill_from_rank0(model: nn.Module, full_state: dict | None) -> None:
    """Give every rank rank 0's weights: its slice of each parameter, and every buffer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # strict=False: FSDP1 with use_orig_params=False leaves a tied parameter's second name
    # (lm_head.weight) out of what the other ranks expect; it is the same storage as the first.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, dict(full_state) if full_state is not None else {}, options=options)  # a copy
    persistent = set(full_state or {}) if dist.get_rank() == 0 else None
    names = [persistent]
    dist.broadcast_object_list(names, src=0)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if _clean(name) not in names[0]:  # non-persistent: not in the state dict, uninitialised
                dist.broadcast(buffer.data, src=0)


def _clean(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
