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
from dataclasses import replace

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
from fsdp_nb.layout.mesh_layout import per_rank
from fsdp_nb.layout.model import Fsdp1Layout, Fsdp2Layout, shard_flat
from fsdp_nb.layout.rules import fsdp1_problems, fsdp2_problems
from fsdp_nb.layout.specs import ParamSpec, Segment
from fsdp_nb.layout.tp_plan import TP_SHARD0, placements_of


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


def _tp_place(p: DTensor, me: int) -> tuple[str | None, int, int]:
    """(placement on the "tp" mesh dim or None, T, global rank `me`'s t) of a parameter's DTensor.

    `me`'s place is looked up in the mesh's rank grid, which every rank shares, rather than
    read from `get_coordinate()`: DTensor may hand out an equal mesh object made for another rank
    when ranks share a process (as under the fake process group of the layout tests).
    """
    names = p.device_mesh.mesh_dim_names or ()
    if "tp" not in names:
        return None, 0, -1  # T and t come from the world [Note: TP layouts]
    i = names.index("tp")
    where = (p.device_mesh.mesh == me).nonzero()
    return repr(p.placements[i]), p.device_mesh.size(i), int(where[0, i]) if len(where) else -1


def _cut(rows: int, placement: str | None, S: int, T: int, s: int, t: int) -> tuple[int, int]:
    """Rows `[start, stop)` of rank (s, t), by torch's own chunk arithmetic: TP's cut, then FSDP's."""
    first, size = 0, rows
    if placement == TP_SHARD0:
        size, first = shard_size_and_offset(rows, T, t)
    n, a = shard_size_and_offset(size, S, s)
    return first + a, first + a + n


def _fsdp2_layout(module: nn.Module) -> Fsdp2Layout:
    entries = _fsdp_params(module)
    if not entries:
        raise ValueError("layout_of: fully_shard manages no parameter of this module")
    me, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    specs, groups, ranges, padded, on_tp = [], [], [], [], []
    meshes = set()
    for name, group, fp in entries:
        p = fp.sharded  # DTensor, global shape
        S, R = fp.shard_world, fp.replicate_world  # mesh (S,), (R, S), (S, T) or (R, S, T)
        placement, T, t = _tp_place(p, me)
        T = T or world // (R * S)
        t = t if t >= 0 else me % T  # a parameter off the "tp" dim: every TP rank holds the same shard
        rank = (fp.replicate_rank * S + fp.shard_rank) * T + t  # row-major place in the mesh
        want = placements_of(placement, R, T)
        if fp.shard_dim != 0 or tuple(map(repr, p.placements)) != want or rank != me:
            raise NotImplementedError(
                f"layout_of: {name} has placements {p.placements} at mesh rank {rank} of global rank {me}; "
                "modelled: FSDP / HSDP on dim 0 over a row-major (R, S, T) mesh, TP colwise or rowwise"
            )
        meshes.add((R * S * T, R, T))
        rows, local_rows = p.shape[0], p.to_local().shape[0]

        own = _cut(rows, placement, S, T, fp.shard_rank, t)
        if own[1] - own[0] != local_rows:
            raise RuntimeError(f"layout_of: {name} has {local_rows} local rows, torch's chunk rule says {own}")
        specs.append(ParamSpec(name=name, shape=tuple(p.shape), dtype=p.dtype, requires_grad=p.requires_grad))
        groups.append(group)
        ranges.append(tuple(_cut(rows, placement, S, T, r // T % S, r % T) for r in range(R * S * T)))
        padded.append(fp.padded_rows)  # rows of the all-gather input on every rank
        on_tp.append(placement)
    if len(meshes) != 1:
        raise NotImplementedError(f"layout_of: parameters are sharded over different meshes {sorted(meshes)}")
    world, replicas, T = meshes.pop()
    return Fsdp2Layout(
        params=tuple(specs),
        world_size=world,
        dp_replicate=replicas,
        tp=T,
        tp_placements=tuple(on_tp) if T > 1 else (),
        groups=tuple(groups),
        row_ranges=tuple(ranges),
        padded_rows=tuple(padded),
        problems=fsdp2_problems(specs, groups),
        observed_ranks=(me,),
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
