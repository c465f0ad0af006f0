"""Where every parameter element lives under FSDP1 and FSDP2.

The pure core, with no process group and no display:
- `specs`: the shared types (`ParamSpec`, `Segment`, `RankBytes`, `Problem`), a leaf module;
- `model`: FSDP1 and FSDP2 layouts computed from parameter shapes alone;
- `rules`: what torch refuses, and why;
- `mesh_layout`: the (R, S) mesh a layout lives on, how a dim is cut, torch's placements.
Beside it, `inspect` reads the same types from a live sharded module on a rank.
"""

from __future__ import annotations

from fsdp_nb.layout.model import Fsdp1Layout, Fsdp2Layout, chunk_range, fsdp1_layout, fsdp2_layout, shard_flat
from fsdp_nb.layout.specs import ParamSpec, Problem, RankBytes, Segment, specs_of

__all__ = [
    "Fsdp1Layout",
    "Fsdp2Layout",
    "ParamSpec",
    "Problem",
    "RankBytes",
    "Segment",
    "chunk_range",
    "fsdp1_layout",
    "fsdp2_layout",
    "shard_flat",
    "specs_of",
]
