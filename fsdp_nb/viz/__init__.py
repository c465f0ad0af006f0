"""Pictures and text of FSDP layouts and memory, plus the no-process layout explorer.

Figures are pure functions of data (a layout or memory reports in, a Figure out);
`explore()` only wires ipywidgets controls to them. Names are imported on first use,
so loading the notebook extension does not import matplotlib's figure code or torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fsdp_nb._lazy import lazy_exports
from fsdp_nb.viz.show import register_figure_formatter

register_figure_formatter()  # figures returned by these functions render in notebooks

_LAZY = {
    **dict.fromkeys(
        ["draw_fsdp1", "draw_fsdp2", "plot_comparison", "plot_fsdp1", "plot_fsdp2"], "fsdp_nb.viz.layout_figs"
    ),
    **dict.fromkeys(["plot_layout", "plot_mesh_layout"], "fsdp_nb.viz.mesh_figs"),
    "plot_memory": "fsdp_nb.viz.memory_figs",
    **dict.fromkeys(
        ["format_fsdp1", "format_fsdp2", "format_layout", "format_memory", "format_problems", "format_shapes"],
        "fsdp_nb.viz.tables",
    ),
    "explore": "fsdp_nb.viz.explorer",
    "plot_timeline": "fsdp_nb.viz.timeline",
}
__all__ = [
    "draw_fsdp1",
    "draw_fsdp2",
    "explore",
    "format_fsdp1",
    "format_fsdp2",
    "format_layout",
    "format_memory",
    "format_problems",
    "format_shapes",
    "plot_comparison",
    "plot_fsdp1",
    "plot_fsdp2",
    "plot_layout",
    "plot_memory",
    "plot_mesh_layout",
    "plot_timeline",
]
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

if TYPE_CHECKING:
    from fsdp_nb.viz.explorer import explore
    from fsdp_nb.viz.layout_figs import draw_fsdp1, draw_fsdp2, plot_comparison, plot_fsdp1, plot_fsdp2
    from fsdp_nb.viz.memory_figs import plot_memory
    from fsdp_nb.viz.mesh_figs import plot_layout, plot_mesh_layout
    from fsdp_nb.viz.tables import (
        format_fsdp1,
        format_fsdp2,
        format_layout,
        format_memory,
        format_problems,
        format_shapes,
    )
    from fsdp_nb.viz.timeline import plot_timeline
