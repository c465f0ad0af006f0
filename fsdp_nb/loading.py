"""`cpu_ram_efficient_loading`: rank 0 holds the real weights, the other ranks never hold the whole model.

    model = build_on_rank0(lambda: GPT(config), fsdp)   # real on rank 0, meta (no memory) elsewhere
    model = shard(model, fsdp)                          # shards filled by broadcast from rank 0

The order inside `shard()`, and why:
1. rank 0 keeps a reference to its full state dict before sharding replaces the
   parameters;
2. the other ranks get storage for their shards only: FSDP2 shards the meta model
   and `materialize` allocates the local shards; FSDP1 allocates one unit at a time,
   through a `param_init_fn` that keeps tied parameters tied, just before it
   flattens and shards that unit. Rank 0, which holds no meta tensor, allocates
   nothing: its real tensors, non-persistent buffers included, keep their values;
3. every rank checks what it is about to receive, rank 0 that it has every name at
   the right shape, and the ranks agree on the outcome [Note: fail together]
   before the first broadcast, so an error on one rank is an error on all of them
   at once, not a minute-long wait in a broadcast;
4. rank 0's tensors are broadcast one by one and each rank keeps its own slice:
   FSDP2 through `set_model_state_dict(..., broadcast_from_rank0=True)`; FSDP1 by
   copying each parameter's slice straight into the local FlatParameter shard, at
   the offsets torch recorded, because FSDP1's full-state load unshards every
   FlatParameter first, which costs the whole model again;
5. buffers that are not in the state dict (non-persistent) are broadcast too:
   the meta ranks have no values for them.
`reset_parameters()` is never called on the empty shards: on CPU, DTensor has no
RNG of its own, so every rank would draw the same "random" shard.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from fsdp_nb._torch import clean_name, flat_info, fsdp1_handles, joined
from fsdp_nb.phases import fail_together

PHASE = "cpu_ram_efficient_loading"


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
    """Rank 0's full state dict, taken before sharding replaces its parameters; None elsewhere.

    Rank 0 is the source of every weight, so a meta tensor there is an error, raised on
    every rank before any of them starts to shard."""
    with fail_together(f"{PHASE} (rank 0's weights)"):
        if dist.get_rank() != 0:
            return None
        meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if meta:
            raise ValueError(
                f"cpu_ram_efficient_loading: rank 0 holds {clean_name(meta[0])} on the meta device, but rank 0 "
                "is where every weight comes from; build the model with build_on_rank0(factory, config), "
                "which makes it real on rank 0 and meta elsewhere"
            )
        return model.state_dict()


def broadcast_from_rank0(model: nn.Module) -> None:
    """Overwrite every parameter and buffer with rank 0's values (works on gloo/CPU)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate (uninitialised) storage for meta tensors, keeping tied parameters tied.

    Only a rank whose model holds meta tensors does anything: `to_empty` replaces every
    tensor, and on rank 0 the real ones, non-persistent buffers included, are the values
    the other ranks are about to receive. `to_empty` gives each owner of a shared
    parameter its own new tensor, so the ties are made again afterwards."""
    if not has_meta(model):
        return
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
                setattr(module, name, made[id(p)])
        for name, b in list(module.named_buffers(recurse=False)):
            if b.is_meta:
                setattr(module, name, torch.empty_like(b, device=device))

    return init


def _check_rank0_has(full_state: dict | None, wanted: dict[str, tuple[int, ...]]) -> None:
    """Rank 0: every tensor the ranks will ask for is in its state dict, at the shape they expect."""
    if full_state is None:
        return
    for name, shape in wanted.items():
        if name not in full_state:
            raise KeyError(
                f"cpu_ram_efficient_loading: rank 0's state dict has no {name!r}, which the sharded model "
                f"holds; its keys start {sorted(full_state)[:3]}"
            )
        if tuple(full_state[name].shape) != tuple(shape):
            raise ValueError(
                f"cpu_ram_efficient_loading: {name} is {tuple(full_state[name].shape)} on rank 0 but "
                f"{tuple(shape)} in the sharded model"
            )


def fill_fsdp1_from_rank0(model: nn.Module, full_state: dict | None) -> None:
    """FSDP1: every rank receives rank 0's parameters one at a time and keeps the elements of its shard."""
    rank = dist.get_rank()
    with fail_together(PHASE):  # everything that can fail on one rank, before the first broadcast
        plan = []  # (name, shape, this rank's FlatParameter shard, its piece of the parameter or None)
        for prefix, handle in fsdp1_handles(model).items():
            info = flat_info(handle)
            plan += [(joined(prefix, n), s, info.flat, p) for n, s, p in zip(info.names, info.shapes, info.pieces)]
        flattened = {name for name, *_ in plan}
        # what FSDP1 does not flatten (ignored modules): whole parameters, from rank 0
        rest = [(clean_name(n), t) for n, t in model.named_parameters() if not _is_flat(n)]
        rest = [(n, t) for n, t in rest if n not in flattened]
        if rank == 0:
            _check_rank0_has(full_state, {n: s for n, s, *_ in plan} | {n: t.shape for n, t in rest})
    with torch.no_grad():
        for name, shape, flat, piece in plan:
            device = flat.device  # nccl moves only tensors on the rank's GPU
            if rank == 0:
                full = full_state[name].to(device=device, dtype=flat.dtype)
            else:
                full = torch.empty(shape, dtype=flat.dtype, device=device)
            dist.broadcast(full, src=0)
            if piece is not None:  # elements [start, stop) of the parameter sit at `offset` of this shard
                values = full.reshape(-1)[piece.start : piece.stop]
                flat.data[piece.offset : piece.offset + values.numel()].copy_(values)
        for tensor in [t for _, t in rest] + list(model.buffers()):  # every buffer, persistent or not
            dist.broadcast(tensor.data, src=0)


def _is_flat(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "_flat_param"


def fill_from_rank0(model: nn.Module, full_state: dict | None) -> None:
    """FSDP2: give every rank rank 0's weights, its slice of each parameter, and every buffer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    with fail_together(PHASE):  # everything that can fail on one rank, before the first broadcast
        wanted = get_model_state_dict(model, options=StateDictOptions(full_state_dict=False))
        if dist.get_rank() == 0:
            _check_rank0_has(full_state, {n: t.shape for n, t in wanted.items()})
        persistent = {clean_name(n) for n in wanted}
        non_persistent = [b for n, b in model.named_buffers() if clean_name(n) not in persistent]
    # strict=False: FSDP1 with use_orig_params=False leaves a tied parameter's second name
    # (lm_head.weight) out of what the other ranks expect; it is the same storage as the first.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, dict(full_state) if full_state is not None else {}, options=options)  # a copy
    with torch.no_grad():
        for buffer in non_persistent:  # not in any state dict: rank 0's values, whole
            dist.broadcast(buffer.data, src=0)
