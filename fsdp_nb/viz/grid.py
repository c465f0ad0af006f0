"""The page that the mesh figures share (`mesh_figs` for 1-D / HSDP, `tp_figs` for tensor parallelism).

Both lay a figure out by hand, in inches, on one full-figure axes: its panels are as wide as their
widest label needs, as many to a line as fit `WIDTH_IN`, so a notebook's ~950 px output area shows
the figure at its own size and every label keeps its 7 pt (9.7 px). Kept apart so that the TP
figure shares these measures without importing the figure that dispatches to it.
"""

from __future__ import annotations

from fsdp_nb.viz.labels import text_width_pt

WIDTH_IN = 9.4  # at most: the figure is shown 1:1 in a 950 px output area at 100 dpi
TITLE_PT = 9.0
PANEL_TITLE_PT = 7.5
GAP_X, GAP_Y, MARGIN = 0.25, 0.2, 0.1
EMPTY_HATCH = "///"


def inches(text: str, pt: float) -> float:
    """Width in inches of the widest line, with the few % Agg draws wider than the font's metrics."""
    return 1.06 * max(text_width_pt(line, pt) for line in text.split("\n")) / 72
