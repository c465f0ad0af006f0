"""Read the layout and memory torch really produced, on a rank, from a live sharded module.

`layout_of(module)` returns the same `Fsdp1Layout` / `Fsdp2Layout` types that
`fsdp_nb.layout.model` models, so a notebook can put the model and the truth side by side.
A rank sees only its own shard: that one is read from torch (`observed_ranks`), the
other ranks' are derived from torch's own metadata (FSDP1: `_numels_with_padding`,
FSDP2: `Shard.local_shard_size_and_offset`). Gather every rank's result and call
`merge_observed` (in the notebook) to get a layout read from torch on every rank.

FSDP1 with `use_orig_params=False` leaves `module.l1.weight` as a view into freed
storage; touching its data can crash the process. This module reads only
FlatParameter metadata (`_fqns`, `_shapes`, `_shard_param_infos`, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from fsdp_nb._torch import (
    FlatInfo,
    clean_name,
    flat_info,
    fsdp1_handles,
    fsdp2_group,
    fsdp2_params,
    joined,
    shard_size_and_offset,
)
from fsdp_nb.layout.mesh_layout import dp_placements, per_rank
from fsdp_nb.layout.model import Fsdp1Layout, Fsdp2Layout, shard_flat
from fsdp_nb.layout.rules import fsdp1_problems, fsdp2_problems
from fsdp_nb.layout.specs import ParamSpec, RankBytes, Segment


# ---------------------------------------------------------------- FSDP1 ----
def _flat_specs(info: FlatInfo, prefix: str) -> tuple[ParamSpec, ...]:
    return tuple(
        ParamSpec(name=joined(prefix, name), shape=tuple(shape), dtype=info.dtype, requires_grad=g)
        for name, shape, g in zip(info.names, info.shapes, info.requires_grad)
    )


def _own_shard(info: FlatInfo, names: list[str]) -> tuple[Segment, ...]:
    """This rank's chunk from torch's shard metadata: parameter pieces by offset, gaps are padding."""
    pieces = sorted((p.offset, name, p.start, p.stop) for name, p in zip(names, info.pieces) if p is not None)
    out, cursor = [], 0
    for offset, name, start, stop in pieces:
        if offset > cursor:  # alignment padding between parameters
            out.append(Segment(None, 0, offset - cursor))
        out.append(Segment(name, start, stop))  # flat_param[offset : offset + stop - start]
        cursor = offset + stop - start
    if info.local_numel > cursor:  # world-size padding, or `_shard_numel_padded` on the last ranks
        out.append(Segment(None, 0, info.local_numel - cursor))
    return tuple(out)


def _fsdp1_layout(handle, prefix: str) -> Fsdp1Layout:
    info = flat_info(handle)
    # NO_SHARD keeps the whole FlatParameter on every rank: a group of one.
    # HYBRID_SHARD: S = info.world_size ranks shard, R = info.replicas copies [Note: N-D layouts].
    S, world = info.world_size, info.world_size * info.replicas
    rank = info.replica_rank * S + info.rank  # row-major on the (R, S) mesh
    specs = _flat_specs(info, prefix)
    names = iter(s.name for s in specs)
    entries = tuple(
        Segment(None, 0, n) if pad else Segment(next(names), 0, n)
        for n, pad in zip(info.numels_with_padding, info.is_padding)
    )
    shards = list(per_rank(shard_flat(entries, S), world))
    shards[rank] = _own_shard(info, [s.name for s in specs])
    return Fsdp1Layout(
        params=specs,
        world_size=world,
        use_orig_params=info.use_orig_params,
        flat=entries,
        shards=tuple(shards),
        problems=fsdp1_problems(specs, info.use_orig_params),
        observed_ranks=(rank,),
        dp_replicate=info.replicas,
    )


def fsdp1_layouts_of(module: nn.Module) -> dict[str, Fsdp1Layout]:
    """One layout per FlatParameter of an FSDP1 module, keyed by the wrapped module's name ("" = root)."""
    return {name: _fsdp1_layout(h, name) for name, h in fsdp1_handles(module).items()}


# ---------------------------------------------------------------- FSDP2 ----
DP_1D, DP_2D = dp_placements(1), dp_placements(2)  # ("Shard(dim=0)",), ("Replicate()", "Shard(dim=0)")


def _fsdp_params(module: nn.Module) -> list[tuple[str, str, object]]:
    """(parameter name, fully_shard group name, ShardedParamInfo) in `named_parameters` order."""
    names = {id(m): n for n, m in module.named_modules()}
    found = {}
    for m in module.modules():
        if not isinstance(m, FSDPModule):
            continue
        group = fsdp2_group(m)
        for fp in fsdp2_params(group) if group is not None else ():
            found[joined(names[id(fp.module)], fp.param_name)] = (names[id(m)], fp)
    return [(n, *found[n]) for n, _ in module.named_parameters() if n in found]


def _fsdp2_layout(module: nn.Module) -> Fsdp2Layout:
    entries = _fsdp_params(module)
    if not entries:
        raise ValueError("layout_of: fully_shard manages no parameter of this module")
    specs, groups, ranges, padded = [], [], [], []
    meshes = set()
    for name, group, fp in entries:
        p = fp.sharded  # DTensor, global shape
        if fp.shard_dim != 0 or tuple(map(repr, p.placements)) not in (DP_1D, DP_2D):
            raise NotImplementedError(
                f"layout_of: {name} has placements {p.placements}; only FSDP / HSDP on dim 0 (the default) is modelled"
            )
        S, R = fp.shard_world, fp.replicate_world  # mesh (S,) or (R, S) [Note: N-D layouts]
        world, rank = R * S, fp.replicate_rank * S + fp.shard_rank  # row-major place in the mesh
        meshes.add((world, R))
        rows = p.shape[0]
        local_rows = p.to_local().shape[0]
        size, start = shard_size_and_offset(rows, S, fp.shard_rank)
        if size != local_rows:
            raise RuntimeError(f"layout_of: {name} has {local_rows} local rows, torch's chunk rule says {size}")
        # other ranks: torch's own chunk arithmetic, rank r·S + s holds shard s
        cut = [shard_size_and_offset(rows, S, s) for s in range(S)]  # (rows, first row) per shard rank
        rank_ranges = [(a, a + n) for n, a in per_rank(cut, world)]
        rank_ranges[rank] = (start, start + local_rows)  # ours: read from to_local()
        specs.append(ParamSpec(name=name, shape=tuple(p.shape), dtype=p.dtype, requires_grad=p.requires_grad))
        groups.append(group)
        ranges.append(tuple(rank_ranges))
        padded.append(fp.padded_rows)  # rows of the all-gather input on every rank
    if len(meshes) != 1:
        raise NotImplementedError(f"layout_of: parameters are sharded over different meshes {sorted(meshes)}")
    world, replicas = meshes.pop()
    return Fsdp2Layout(
        params=tuple(specs),
        world_size=world,
        dp_replicate=replicas,
        groups=tuple(groups),
        row_ranges=tuple(ranges),
        padded_rows=tuple(padded),
        problems=fsdp2_problems(specs, groups),
        observed_ranks=(rank,),
    )


def _is_fsdp2(module: nn.Module) -> bool:
    return any(isinstance(m, FSDPModule) for m in module.modules())


# ----------------------------------------------------------------- both ----
def layout_of(module: nn.Module) -> Fsdp1Layout | Fsdp2Layout:
    """The layout torch built for `module` (FSDP2, or FSDP1 with one FlatParameter), seen from this rank."""
    if _is_fsdp2(module):
        return _fsdp2_layout(module)
    layouts = fsdp1_layouts_of(module)
    if not layouts:
        raise TypeError(
            f"layout_of: {type(module).__name__} is not sharded; wrap it with FSDP(...) or "
            "fully_shard(...), or model it with fsdp_nb.layout.fsdp1_layout(specs_of(module), world_size)"
        )
    if len(layouts) > 1:
        raise ValueError(
            f"layout_of: the module has {len(layouts)} FlatParameters (wrapping {sorted(layouts)}); "
            "pick one with fsdp1_layouts_of(module)[name]"
        )
    return next(iter(layouts.values()))


def merge_observed(per_rank: Sequence[Fsdp1Layout | Fsdp2Layout]) -> Fsdp1Layout | Fsdp2Layout:
    """Combine the layouts that ranks read from torch (`per_rank[r]` from rank r) into one.

    Each rank only sees its own shard; the result takes rank r's shard from rank r.
    """
    first = per_rank[0]
    if len(per_rank) != first.world_size:
        raise ValueError(f"merge_observed: got {len(per_rank)} layouts for world_size={first.world_size}")
    for r, lay in enumerate(per_rank):
        if type(lay) is not type(first) or lay.params != first.params or r not in lay.observed_ranks:
            raise ValueError(f"merge_observed: layout {r} is not rank {r}'s view of the same parameters")
    if isinstance(first, Fsdp1Layout):
        return replace(
            first,
            shards=tuple(lay.shards[r] for r, lay in enumerate(per_rank)),
            observed_ranks=tuple(range(first.world_size)),
        )
    world = range(first.world_size)
    ranges = tuple(tuple(per_rank[r].row_ranges[i][r] for r in world) for i in range(len(first.params)))
    return replace(first, row_ranges=ranges, observed_ranks=tuple(range(first.world_size)))


def specs_of_sharded(module: nn.Module) -> tuple[ParamSpec, ...]:
    """The original parameters of a sharded module (full shapes), in the unsharded `named_parameters` order.

    Feed them to `fsdp1_layout` / `fsdp2_layout` to model the other FSDP version.
    """
    if _is_fsdp2(module):
        return tuple(_fsdp2_layout(module).params)
    specs = [s for name, h in fsdp1_handles(module).items() for s in _flat_specs(flat_info(h), name)]
    # Nested FlatParameters list their parameters out of order; sort by owning module, pre-order.
    order = {}
    for n, _ in module.named_modules():
        order.setdefault(clean_name(n), len(order))
    position = {s.name: i for i, s in enumerate(specs)}
    return tuple(sorted(specs, key=lambda s: (order.get(s.name.rpartition(".")[0], -1), position[s.name])))


@dataclass(frozen=True, kw_only=True)
class MemoryReport:
    """Real storage bytes on one rank, from `memory_of`: parameters, gradients, optimizer state."""

    rank: int
    world_size: int
    params: RankBytes
    grads: RankBytes
    optimizer: RankBytes

    @property
    def total(self) -> int:
        return self.params.total + self.grads.total + self.optimizer.total


class _Ledger:
    """Unique storages (by data pointer) and the byte ranges of real data inside them."""

    def __init__(self):
        self.nbytes: dict[int, int] = {}
        self.real: dict[int, list[tuple[int, int]]] = {}

    def add(self, t: torch.Tensor, pieces=None) -> None:
        """`pieces`: (element offset, numel) of real data in flat `t`; None means all of `t`."""
        if isinstance(t, DTensor):
            t = t.to_local()
        storage = t.untyped_storage()
        if storage.nbytes() == 0:  # e.g. a use_orig_params view with nothing on this rank
            return
        ptr, item, base = storage.data_ptr(), t.element_size(), t.storage_offset()
        self.nbytes[ptr] = storage.nbytes()
        for start, numel in pieces if pieces is not None else [(0, t.numel())]:
            self.real.setdefault(ptr, []).append(((base + start) * item, (base + start + numel) * item))

    def bytes(self) -> RankBytes:
        real = 0
        for ranges in self.real.values():  # union of possibly overlapping views
            end = 0
            for a, b in sorted(ranges):
                real += max(0, b - max(a, end))
                end = max(end, b)
        total = sum(self.nbytes.values())
        return RankBytes(real=real, padding=total - real)


def memory_of(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
    """Bytes this rank really holds for parameters, gradients and optimizer state.

    Storages are counted once each, whole, so padding counts; `real` is the part
    covered by parameter data. Call it between steps, when parameters are sharded.
    """
    pieces = {}
    for h in fsdp1_handles(module).values():  # FSDP1: real pieces of each local FlatParameter chunk
        info = flat_info(h)
        real = [(p.offset, p.stop - p.start) for p in info.pieces if p is not None]
        pieces[id(info.flat)] = (info.flat, real)
    tensors = list(pieces.values()) + [(p, None) for p in module.parameters() if id(p) not in pieces]
    params, grads, optim = _Ledger(), _Ledger(), _Ledger()
    for t, real in tensors:
        params.add(t, real)
        if t.grad is not None:
            grads.add(t.grad, real if t.grad.numel() == t.numel() else None)
    if optimizer is not None:
        for p, state in optimizer.state.items():
            real = pieces[id(p)][1] if id(p) in pieces else None
            for value in state.values():
                if isinstance(value, torch.Tensor):  # exp_avg like the FlatParameter chunk, or a scalar step
                    optim.add(value, real if real is not None and value.numel() == p.numel() else None)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return MemoryReport(
        rank=rank, world_size=world, params=params.bytes(), grads=grads.bytes(), optimizer=optim.bytes()
    )
