"""Per-rank memory as bars: real data solid, padding hatched.

`plot_memory` takes either layouts (the bytes a layout implies, one bar per layout
per rank, e.g. FSDP1 next to FSDP2) or `MemoryReport`s read from the ranks
(parameters, gradients and optimizer state stacked). Patch gids:
"rank<r>/<series>/real" and "rank<r>/<series>/padding".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from fsdp_nb.layout import Fsdp1Layout, Fsdp2Layout, RankBytes
from fsdp_nb.viz.labels import LABEL_PT, FitText
from fsdp_nb.viz.layout_figs import PAD_FACE, PAD_HATCH

CATEGORY_COLORS = {"params": "#4C72B0", "grads": "#DD8452", "optimizer": "#55A868"}
SERIES_COLORS = ("#4C72B0", "#C44E52", "#8172B3", "#937860")


def _stack(ax, x, width, parts: Sequence[tuple[str, RankBytes, str]], rank: int) -> float:
    """Draw one stacked bar at x: for each (series, bytes, colour) real then padding. Returns its top."""
    bottom = 0.0
    for series, b, color in parts:
        for kind, value in (("real", b.real), ("padding", b.padding)):
            if value <= 0:
                continue
            pad = kind == "padding"
            ax.bar(
                x,
                value,
                width,
                bottom=bottom,
                color=PAD_FACE if pad else color,
                edgecolor=color if pad else "#555555",
                hatch=PAD_HATCH if pad else None,
                linewidth=0.6,
                gid=f"rank{rank}/{series}/{kind}",
            )
            bottom += value
    return bottom


def _total(ax, x, slot, top) -> None:
    """The bar's total above it, upright or turned, within its slot of the x axis; left out if neither fits."""
    text = f"{top:.0f}"
    FitText(ax, (x - slot / 2, top, slot, math.inf), [(text, 0), (text, 90)], above=True, gid="total")


def _is_report(item) -> bool:
    """A `fsdp_nb.inspect.MemoryReport` (duck-typed: the kernel need not import rank-side code)."""
    return all(hasattr(item, a) for a in ("rank", "params", "grads", "optimizer"))


def _layout_series(source) -> dict[str, Fsdp1Layout | Fsdp2Layout]:
    if isinstance(source, (Fsdp1Layout, Fsdp2Layout)):
        return {f"FSDP{source.version}": source}
    if isinstance(source, Mapping):
        return dict(source)
    return {f"FSDP{lay.version}" + (f" #{i}" if i else ""): lay for i, lay in enumerate(source)}


def plot_memory(source) -> Figure:
    """Bytes per rank.

    `source` is a layout, a list or dict of layouts (same world size; bars side by
    side per rank), or a list of `MemoryReport` (one per rank, from `memory_of`).
    """
    items = (
        list(source.values())
        if isinstance(source, Mapping)
        else ([source] if isinstance(source, (Fsdp1Layout, Fsdp2Layout)) else list(source))
    )
    if not items:
        raise ValueError("plot_memory: nothing to plot")
    fig = Figure(figsize=(7, 3.5), layout="constrained")
    ax = fig.add_subplot()
    if all(_is_report(m) for m in items):
        reports = sorted(items, key=lambda m: m.rank)
        for m in reports:
            parts = [(c, getattr(m, c), CATEGORY_COLORS[c]) for c in CATEGORY_COLORS]
            top = _stack(ax, m.rank, 0.6, parts, m.rank)
            _total(ax, m.rank, 1.0, top)
        legend = [Patch(facecolor=c, label=n) for n, c in CATEGORY_COLORS.items()]
        ranks = [m.rank for m in reports]
        ax.set_title("Memory per rank, read from torch", fontsize=9)
    elif all(isinstance(m, (Fsdp1Layout, Fsdp2Layout)) for m in items):
        series = _layout_series(source)
        worlds = {lay.world_size for lay in series.values()}
        if len(worlds) != 1:
            raise ValueError(f"plot_memory: layouts have different world sizes {sorted(worlds)}")
        ranks = list(range(worlds.pop()))
        width = 0.8 / len(series)
        for k, (name, lay) in enumerate(series.items()):
            color = SERIES_COLORS[k % len(SERIES_COLORS)]
            for r in ranks:
                x = r - 0.4 + width * (k + 0.5)
                top = _stack(ax, x, width * 0.9, [(name, lay.bytes(r), color)], r)
                _total(ax, x, width, top)
        legend = [Patch(facecolor=SERIES_COLORS[k % len(SERIES_COLORS)], label=n) for k, n in enumerate(series)]
        ax.set_title("Parameter bytes per rank", fontsize=9)
    else:
        raise TypeError(
            f"plot_memory: expected layouts or MemoryReports, not a mix of {sorted({type(m).__name__ for m in items})}"
        )
    legend.append(Patch(facecolor=PAD_FACE, hatch=PAD_HATCH, edgecolor="#555555", label="padding"))
    # right of the axes: outside the bars, whatever their heights
    ax.legend(handles=legend, fontsize=LABEL_PT, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_xticks(ranks)
    ax.set_xticklabels([f"rank {r}" for r in ranks])
    ax.set_ylabel("bytes")
    ax.margins(y=0.2)  # headroom for the totals, turned upright when bars are narrow
    return fig
