"""`fsdp_nb.inspect`: the public path of the live layout and memory readers in `fsdp_nb.layout`."""

from __future__ import annotations

from fsdp_nb.layout.inspect import fsdp1_layouts_of, layout_of, merge_observed, specs_of_sharded
from fsdp_nb.layout.memory import MemoryReport, memory_of

__all__ = ["MemoryReport", "fsdp1_layouts_of", "layout_of", "memory_of", "merge_observed", "specs_of_sharded"]
