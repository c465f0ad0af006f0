"""Where every parameter element lives, computed from shapes alone.

No process group, no display: `fsdp1_layout` and `fsdp2_layout` model what torch
builds, and `fsdp_nb.inspect.layout_of` returns the same types read from a live
sharded module, so the two can be compared element for element. Layouts are
frozen dataclasses of plain values: they pickle from ranks to the notebook.

[Note: FSDP1 flat layout]
FSDP1 concatenates the parameters of one wrapped module, in `named_parameters`
order, into one 1-D FlatParameter. With `use_orig_params=True` it inserts padding
before each parameter so every parameter starts on a 16-byte boundary (4 fp32
elements, 8 bf16), then pads the end to a multiple of the world size. The flat
tensor is cut with `torch.chunk` into `ceil(N / world)` elements per rank; ranks
whose chunk runs past the end hold padding instead (with `use_orig_params=False`
this is the only padding). A parameter may straddle ranks.

[Note: FSDP2 row layout]
FSDP2 keeps one DTensor per parameter and cuts dim 0 with `torch.chunk`:
`ceil(rows / world)` rows per rank, so the last ranks may get fewer rows or none.
Each rank stores its shard padded to `ceil(rows / world)` rows so the all-gather
moves equal sizes; the padding is real memory but invisible in `to_local()`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fsdp_nb.layout.base import Layout, check_specs
from fsdp_nb.layout.mesh_layout import chunk_range, index_ranges, per_rank, shard_flat, shard_size
from fsdp_nb.layout.rules import fsdp1_problems, fsdp2_problems
from fsdp_nb.layout.specs import ParamSpec, Problem, RankBytes, Segment
from fsdp_nb.layout.tp_plan import mesh_coords, placements_of, tp_cols, tp_placements, tp_rows

ALIGNMENT_BYTES = 16  # FSDP1 aligns each parameter's start for use_orig_params=True


@dataclass(frozen=True, kw_only=True)
class Fsdp1Layout(Layout):
    """One FSDP1 FlatParameter: its unsharded order and every rank's equal chunk."""

    params: tuple[ParamSpec, ...]
    """The flattened parameters, in FlatParameter order."""
    world_size: int
    """All ranks, R·S; the FlatParameter is cut into S chunks and each chunk kept by R ranks."""
    use_orig_params: bool
    flat: tuple[Segment, ...]
    """The unsharded FlatParameter: whole parameters and alignment / shard-group padding."""
    shards: tuple[tuple[Segment, ...], ...]
    """`shards[r]`: rank r's chunk in order, shard padding included (replicas repeat their peer's)."""
    problems: tuple[Problem, ...] = ()
    observed_ranks: tuple[int, ...] = ()
    """Ranks whose chunk was read from torch (empty: fully modelled)."""
    dp_replicate: int = 1
    """R: copies of every chunk (HSDP's `HYBRID_SHARD` over an (R, S) mesh); 1 is plain FSDP."""

    version = 1

    def __post_init__(self):
        self._check_mesh(len(self.shards))
        sizes = {sum(seg.numel for seg in shard) for shard in self.shards}
        if len(sizes) != 1:
            raise ValueError(f"Fsdp1Layout: rank chunks must have equal numel, got {sorted(sizes)}")

    def segments(self, rank: int) -> tuple[Segment, ...]:
        """Rank `rank`'s chunk in order: `(name, start, stop)` of flattened params, `(None, 0, n)` padding."""
        return self.shards[self._rank(rank)]

    def elements(self, name: str, rank: int) -> torch.Tensor:
        """Flat indices into unsharded `name` that rank `rank` stores, in storage order, padding excluded."""
        self._index(name)
        return index_ranges([(seg.start, seg.stop) for seg in self.segments(rank) if seg.name == name])

    @property
    def total_numel(self) -> int:
        """Elements of real parameter data."""
        return sum(s.numel for s in self.params)

    @property
    def chunk_numel(self) -> int:
        """Elements each rank stores, padding included."""
        return sum(seg.numel for seg in self.shards[0])

    @property
    def padded_numel(self) -> int:
        """Elements of the padded, unsharded FlatParameter (`chunk_numel * shard_size`)."""
        return self.chunk_numel * self.shard_size

    @property
    def padding_numel(self) -> int:
        return self.padded_numel - self.total_numel

    def bytes(self, rank: int) -> RankBytes:
        """Bytes rank `rank` stores for this FlatParameter (padding has the first parameter's dtype)."""
        itemsize = {s.name: s.itemsize for s in self.params}
        real = pad = 0
        for seg in self.segments(rank):
            if seg.name is None:
                pad += seg.numel * self.params[0].itemsize
            else:
                real += seg.numel * itemsize[seg.name]
        return RankBytes(real=real, padding=pad)


@dataclass(frozen=True, kw_only=True)
class Fsdp2Layout(Layout):
    """FSDP2: every parameter's dim-0 rows per rank, and the padded rows each rank stores."""

    params: tuple[ParamSpec, ...]
    world_size: int
    """All ranks, R·S; dim 0 is cut over the S ranks of a shard group."""
    groups: tuple[str, ...]
    """Per parameter: the module whose `fully_shard` call owns it ("" = the root)."""
    row_ranges: tuple[tuple[tuple[int, int], ...], ...]
    """`row_ranges[i][r]`: rows `[start, stop)` of parameter i on rank r (of the whole dim 0)."""
    padded_rows: tuple[int, ...]
    """Per parameter: dim-0 size of every rank's padded local storage (`ceil(tp-local rows / shard_size)`)."""
    problems: tuple[Problem, ...] = ()
    observed_ranks: tuple[int, ...] = ()
    dp_replicate: int = 1
    """R: copies of every shard (HSDP over an (R, S) mesh); 1 is plain FSDP on a 1-D mesh."""
    tp: int = 1
    """T: the tensor-parallel dim, last on the (R, S, T) mesh [Note: TP layouts]."""
    tp_placements: tuple[str | None, ...] = ()
    """Per parameter: its placement on the "tp" dim, None where the plan leaves it out (empty: all None)."""

    version = 2

    def __post_init__(self):
        n = len(self.params)
        if not (len(self.groups) == len(self.row_ranges) == len(self.padded_rows) == n):
            raise ValueError("Fsdp2Layout: groups, row_ranges and padded_rows need one entry per parameter")
        if self.tp_placements and len(self.tp_placements) != n:
            raise ValueError("Fsdp2Layout: tp_placements needs one entry per parameter (or none)")
        for ranges in self.row_ranges:
            self._check_mesh(len(ranges))

    def placements(self, name: str) -> tuple[str, ...]:
        """torch's placements of `name`, e.g. `("_StridedShard(dim=0, sf=2)", "Shard(dim=0)")` for colwise TP."""
        i = self._index(name)
        return placements_of(self.tp_placements[i] if self.tp_placements else None, self.dp_replicate, self.tp)

    def cols(self, name: str, rank: int) -> tuple[int, int] | None:
        """Columns `[start, stop)` of dim 1 held by `rank` under rowwise TP; None: whole rows."""
        i = self._index(name)
        placement = self.tp_placements[i] if self.tp_placements else None
        return tp_cols(self.params[i].shape, placement, self.tp, self._rank(rank) % self.tp)

    def rows(self, name: str, rank: int) -> tuple[int, int]:
        """Rows `[start, stop)` of dim 0 of `name` held by `rank` (`start == stop`: empty shard)."""
        return self.row_ranges[self._index(name)][self._rank(rank)]

    def local_shape(self, name: str, rank: int) -> tuple[int, ...]:
        """Shape of `to_local()` on `rank`."""
        start, stop = self.rows(name, rank)
        cols, shape = self.cols(name, rank), self.param(name).shape
        return (stop - start,) + ((cols[1] - cols[0],) if cols else shape[1:2]) + shape[2:]

    def elements(self, name: str, rank: int) -> torch.Tensor:
        """Flat indices into unsharded `name` that rank `rank` stores (`to_local().flatten()` order)."""
        start, stop = self.rows(name, rank)
        shape, cols = self.param(name).shape, self.cols(name, rank)
        if cols is not None:  # rowwise TP: rows [start, stop) × columns [c0, c1) of a 2-D weight
            return (torch.arange(start, stop)[:, None] * shape[1] + torch.arange(*cols)[None, :]).flatten()
        row_numel = math.prod(shape[1:])
        return index_ranges([(start * row_numel, stop * row_numel)])  # rows [start, stop), row-major

    def padded_local_shape(self, name: str) -> tuple[int, ...]:
        """Shape of the storage every rank keeps for `name` (the all-gather input)."""
        return (self.padded_rows[self._index(name)],) + self.param(name).shape[1:]

    def padded_dim0(self, name: str) -> int:
        """Dim 0 of `name` after the all-gather, before the padding is cut off."""
        return self.padded_rows[self._index(name)] * self.shard_size

    def bytes(self, rank: int) -> RankBytes:
        real = pad = 0
        for i, spec in enumerate(self.params):
            row_numel = math.prod(self.local_shape(spec.name, rank)[1:])
            start, stop = self.row_ranges[i][self._rank(rank)]
            real += (stop - start) * row_numel * spec.itemsize
            pad += (self.padded_rows[i] - (stop - start)) * row_numel * spec.itemsize
        return RankBytes(real=real, padding=pad)


def fsdp1_layout(
    specs: Sequence[ParamSpec],
    world_size: int,
    use_orig_params: bool = False,
    *,
    param_dtype: torch.dtype | None = None,
    dp_replicate: int = 1,
) -> Fsdp1Layout:
    """Model the FlatParameter FSDP1 builds for `specs` (one FSDP unit) on `world_size` ranks.

    `param_dtype` is `MixedPrecision(param_dtype=...)`: it sets the alignment that
    `use_orig_params=True` pads to. `dp_replicate=R > 1` is `HYBRID_SHARD` over an
    (R, world_size / R) mesh [Note: N-D layouts]. The layout is computed even when
    torch would reject the configuration; `.problems` and `.raises` say why it would.
    """
    specs = check_specs(specs)
    S = shard_size(world_size, dp_replicate)
    unsharded_dtype = param_dtype or specs[0].dtype
    aligned_numel = ALIGNMENT_BYTES // unsharded_dtype.itemsize if use_orig_params else 0
    flat, total = [], 0
    for spec in specs:
        pad = (-total) % aligned_numel if aligned_numel else 0
        if pad:  # start the next parameter on a 16-byte boundary
            flat.append(Segment(None, 0, pad))
            total += pad
        flat.append(Segment(spec.name, 0, spec.numel))
        total += spec.numel
    if aligned_numel and total % S:  # divisible by the shard group: no copy before reduce-scatter
        flat.append(Segment(None, 0, (-total) % S))
    return Fsdp1Layout(
        params=specs,
        world_size=world_size,
        use_orig_params=use_orig_params,
        flat=tuple(flat),
        shards=per_rank(shard_flat(flat, S), world_size),
        problems=fsdp1_problems(specs, use_orig_params),
        dp_replicate=dp_replicate,
    )


def _group_of(name: str, groups: Sequence[str]) -> str:
    owners = [g for g in groups if g == "" or name.startswith(g + ".")]
    return max(owners, key=len) if owners else ""


def fsdp2_layout(
    specs: Sequence[ParamSpec],
    world_size: int,
    *,
    groups: Sequence[str] = ("",),
    dp_replicate: int = 1,
    tp: int = 1,
    tp_plan=None,
) -> Fsdp2Layout:
    """Model FSDP2's dim-0 sharding of `specs` on `world_size` ranks.

    `groups` lists the modules `fully_shard` is called on ("" = the root); each
    parameter belongs to the innermost one. Sharding does not depend on groups;
    dtype checks do (e.g. `groups=("l2", "")` keeps a bf16 `l2` apart).
    `dp_replicate=R > 1` is HSDP on an (R, world_size / R) mesh [Note: N-D layouts];
    `tp=T > 1` applies `tp_plan` (`{"l1": "colwise", "l2": "rowwise"}`, a model's
    `base_model_tp_plan`) on a last mesh dim first, (R, S, T) [Note: TP layouts].
    """
    specs = check_specs(specs)
    S = shard_size(world_size, dp_replicate, tp)
    on_tp = tp_placements(specs, tp, tp_plan)
    groups = tuple(groups)
    for g in groups:
        if g and not any(s.name.startswith(g + ".") for s in specs):
            raise ValueError(f"groups: {g!r} owns no parameter; parameters are {[s.name for s in specs]}")
    owner = tuple(_group_of(s.name, groups) for s in specs)
    ranges, padded = [], []
    for spec, placement in zip(specs, on_tp):
        rows = spec.shape[0] if spec.shape else 1
        per = []
        for rank in range(world_size):
            _, s, t = mesh_coords(rank, S, tp)
            first, last = tp_rows(rows, placement, tp, t)  # TP's cut first, then FSDP's chunk of it
            a, b = chunk_range(last - first, S, s)
            per.append((first + a, first + b))
        ranges.append(tuple(per))
        padded.append(-(-(last - first) // S))
    return Fsdp2Layout(
        params=specs,
        world_size=world_size,
        groups=owner,
        row_ranges=tuple(ranges),
        padded_rows=tuple(padded),
        problems=fsdp2_problems(specs, owner),
        dp_replicate=dp_replicate,
        tp=tp,
        tp_placements=on_tp if tp > 1 else (),
    )
