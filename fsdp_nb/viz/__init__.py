"""Pictures and text of FSDP layouts and memory, plus the no-process layout explorer.

Figures are pure functions of data (a layout or memory reports in, a Figure out);
`explore()` only wires ipywidgets controls to them, and is imported on first use.
"""
from __future__ import annotations

from fsdp_nb.viz.layout_figs import draw_fsdp1, draw_fsdp2, plot_comparison, plot_fsdp1, plot_fsdp2
from fsdp_nb.viz.memory_figs import plot_memory
from fsdp_nb.viz.tables import format_fsdp1, format_fsdp2, format_layout, format_memory, format_problems, format_shapes

from fsdp_nb.session.output import register_figure_formatter

register_figure_formatter()  # figures returned by these functions render in notebooks

__all__ = ["draw_fsdp1", "draw_fsdp2", "explore", "format_fsdp1", "format_fsdp2", "format_layout", "format_memory",
           "format_problems", "format_shapes", "plot_comparison", "plot_fsdp1", "plot_fsdp2", "plot_memory"]


def explore(**settings):
    """An interactive FSDP1 / FSDP2 layout explorer (ipywidgets); see `fsdp_nb.viz.explorer`."""
    from fsdp_nb.viz.explorer import explore as _explore

    return _explore(**settings)
