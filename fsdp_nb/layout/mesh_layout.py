"""The device mesh a layout lives on: how one mesh dim cuts a tensor, each rank's place, the placements. Pure.

[Note: N-D layouts]
A layout on `world_size` ranks with `dp_replicate=R` lives on a mesh of shape (R, S),
S = world_size / R, numbered as torch numbers a mesh: row-major, rank = r·S + s. Every
row (fixed r) is one shard group, cut exactly as a 1-D layout on S ranks is; every
column (fixed s) holds R copies of one shard: ranks s, S + s, 2S + s, ... store the
same elements, so a replica holds the same bytes as its shard peer. R = 1 is the 1-D
mesh (S,) that every layout had before: its placements are `("Shard(dim=0)",)`, while
R > 1 is HSDP, `("Replicate()", "Shard(dim=0)")`. Layouts keep one entry per global
rank (replicas repeat), so code that walks `range(world_size)` sees every rank.
Tensor parallelism adds a third dim, last: (R, S, T), rank = (r·S + s)·T + t; each of
the T ranks of a TP group holds its TP piece, cut again over S [Note: TP layouts].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch

from fsdp_nb.layout.specs import Segment
from fsdp_nb.validate import is_int

T = TypeVar("T")

SHARD0 = "Shard(dim=0)"  # repr(torch.distributed.tensor.Shard(0))
REPLICATE = "Replicate()"  # repr(torch.distributed.tensor.Replicate())


def shard_size(world_size, dp_replicate=1, tp=1) -> int:
    """S = world_size / (dp_replicate · tp): the ranks one parameter is sharded over; one-line errors otherwise."""
    if not is_int(world_size) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be an int >= 1")
    divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
    if not is_int(tp) or tp < 1 or world_size % tp:
        raise ValueError(f"tp={tp!r} must divide world_size={world_size}; accepted: {divisors}")
    if not is_int(dp_replicate) or dp_replicate < 1 or world_size % (dp_replicate * tp):
        accepted = [d for d in divisors if world_size % (d * tp) == 0]
        times = f" × tp={tp}" if tp > 1 else ""
        raise ValueError(
            f"dp_replicate={dp_replicate!r}{times} must divide world_size={world_size}; accepted: {accepted}"
        )
    return world_size // (dp_replicate * tp)


def dp_placements(dp_replicate: int) -> tuple[str, ...]:
    """torch's placements of a parameter FSDP shards on dim 0 over the (R, S) mesh, as `repr` strings."""
    return ((REPLICATE,) if dp_replicate > 1 else ()) + (SHARD0,)


def per_rank(per_shard: Sequence[T], world_size: int, tp: int = 1) -> tuple[T, ...]:
    """One entry per global rank from one per shard rank: rank (r·S + s)·T + t holds what shard rank s holds."""
    S = len(per_shard)
    return tuple(per_shard[rank // tp % S] for rank in range(world_size))


def index_ranges(ranges: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The flat indices `[a, b)` of every range, concatenated in order (int64, possibly empty)."""
    parts = [torch.arange(a, b) for a, b in ranges if b > a]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


def chunk_range(numel: int, world_size: int, rank: int) -> tuple[int, int]:
    """`[start, stop)` of `torch.chunk(range(numel), world_size)[rank]`; empty past the end."""
    size = -(-numel // world_size)  # torch.chunk: ceil-sized chunks, fewer if they run out
    return min(rank * size, numel), min((rank + 1) * size, numel)


def shard_flat(flat: Sequence[Segment], world_size: int) -> tuple[tuple[Segment, ...], ...]:
    """Cut an unsharded FlatParameter into `world_size` equal chunks, as FSDP1's `_get_shard` does."""
    total = sum(seg.numel for seg in flat)
    chunk = -(-total // world_size)
    shards = []
    for rank in range(world_size):
        lo, hi = rank * chunk, (rank + 1) * chunk  # rank's elements of the padded flat tensor
        out, offset = [], 0
        for seg in flat:
            a, b = max(lo, offset), min(hi, offset + seg.numel)
            if a < b:
                out.append(
                    Segment(None, 0, b - a)
                    if seg.name is None
                    else Segment(seg.name, seg.start + a - offset, seg.start + b - offset)
                )
            offset += seg.numel
        if hi - max(lo, total) > 0:  # past the end: `_get_shard` pads this rank
            out.append(Segment(None, 0, hi - max(lo, total)))
        shards.append(tuple(out))
    return tuple(shards)
