"""Where every parameter element lives under FSDP1 and FSDP2: the pure layout core.

`model` computes layouts from shapes alone and `rules` says what torch refuses;
`inspect` reads the same types from a live sharded module on a rank.
"""
from __future__ import annotations

from fsdp_nb.layout.model import (Fsdp1Layout, Fsdp2Layout, ParamSpec, RankBytes, Segment, chunk_range,
                                  fsdp1_layout, fsdp2_layout, shard_flat, specs_of)
from fsdp_nb.layout.rules import Problem

__all__ = ["Fsdp1Layout", "Fsdp2Layout", "ParamSpec", "Problem", "RankBytes", "Segment", "chunk_range",
           "fsdp1_layout", "fsdp2_layout", "shard_flat", "specs_of"]
