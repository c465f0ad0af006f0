"""The page that the mesh figures share (`mesh_figs` for 1-D / HSDP, `tp_figs` for tensor parallelism).

Both lay a figure out by hand, in inches, on one full-figure axes: its panels are as wide as their
widest label needs, as many to a line as fit `WIDTH_IN`, so a notebook's ~950 px output area shows
the figure at its own size and every label keeps its 7 pt (9.7 px). Kept apart so that the TP
figure shares these measures without importing the figure that dispatches to it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from matplotlib.figure import Figure

from fsdp_nb.viz.labels import text_width_pt

WIDTH_IN = 9.4  # at most: the figure is shown 1:1 in a 950 px output area at 100 dpi
TITLE_PT = 9.0
PANEL_TITLE_PT = 7.5
GAP_X, GAP_Y, MARGIN = 0.25, 0.2, 0.1
EMPTY_HATCH = "///"


def inches(text: str, pt: float) -> float:
    """Width in inches of the widest line, with the few % Agg draws wider than the font's metrics."""
    return 1.06 * max(text_width_pt(line, pt) for line in text.split("\n")) / 72


class Page(NamedTuple):
    fig: Figure
    ax: object  # one axes over the whole figure, in inches, y up
    width: float
    height: float
    left0: float  # x of the first panel of a line
    title_h: float  # height of the heading


def page(heading: str, n_panels: int, per_line: int, panel_w: float, panel_h: float) -> Page:
    """A figure sized for `n_panels` panels of `panel_w` × `panel_h` inches, `per_line` to a line,
    under a centred `heading`."""
    title_h = 0.2 * len(heading.split("\n")) + 0.1
    lines = math.ceil(n_panels / per_line)
    row_w = per_line * (panel_w + GAP_X) - GAP_X
    width = min(WIDTH_IN, max(row_w, inches(heading, TITLE_PT)) + 2 * MARGIN)
    height = title_h + lines * (panel_h + GAP_Y) - GAP_Y + 2 * MARGIN
    fig = Figure(figsize=(width, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)  # data units are inches, y up
    ax.set_axis_off()
    ax.text(width / 2, height - MARGIN, heading, ha="center", va="top", fontsize=TITLE_PT, gid="title")
    return Page(fig, ax, width, height, (width - row_w) / 2, title_h)
