"""`fsdp_nb.inspect`: the public path of the live layout readers in `fsdp_nb.layout.inspect`."""

from __future__ import annotations

from fsdp_nb.layout.inspect import (
    MemoryReport,
    fsdp1_layouts_of,
    layout_of,
    memory_of,
    merge_observed,
    specs_of_sharded,
)

__all__ = ["MemoryReport", "fsdp1_layouts_of", "layout_of", "memory_of", "merge_observed", "specs_of_sharded"]
