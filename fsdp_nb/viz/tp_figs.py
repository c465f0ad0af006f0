"""Figures of an FSDP2 + tensor-parallel layout on its (R, S, T) mesh: per parameter, a grid of ranks.

Why a figure of its own: under TP a rank's piece is no longer "rows a:b of dim 0". A colwise
parameter is cut by TP first, then by FSDP inside each TP chunk, so shard s holds the s-th
piece of *every* TP chunk, a strided pattern a row range alone hides; a rowwise weight is cut
on columns too; and off-plan parameters, or a rowwise bias, are the same on every TP rank
[Note: TP layouts]. Each panel is R rows (replicas) by S groups of T cells (shard s, tp t),
so a row reads ranks in order: rank (r·S + s)·T + t. A cell names its rank, its rows and
(rowwise) its columns, and carries a small map of the whole parameter (dim 0 downwards) with
the held block filled and TP's cuts dashed: along a shard group the blocks step through the
TP chunks, which is the stride. A cell's colour is the data it holds: replicas share it with
their shard peer, TP peers differ where TP cuts the parameter and share it where it does not.
Gids as in `mesh_figs`: "<name>/rank<r>" on a cell and its label; "<name>/rank<r>/map" on the
map's outline, "<name>/rank<r>/held" on its filled block. Laid out in inches on the page of `grid`, as `mesh_figs` is,
so a notebook shows it at its own size, every label 7 pt or more.
"""

from __future__ import annotations

import matplotlib
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from fsdp_nb.layout import Fsdp2Layout
from fsdp_nb.layout.tp_plan import TP_REPLICATE, TP_SHARD0, TP_SHARD1
from fsdp_nb.viz.grid import EMPTY_HATCH, GAP_X, GAP_Y, MARGIN, PANEL_TITLE_PT, WIDTH_IN, inches, page
from fsdp_nb.viz.labels import LABEL_PT, FitText

CELL_H = 0.5  # three 7 pt lines (rank, rows, columns) and the map beside them
HEAD_H = 0.17  # each of the two header lines: "shard s" over its group, "tp t" over a cell
GROUP_GAP = 0.07  # between shard groups, so the T cells of a group read as one
MAP_W = {1: 0.08, 2: 0.16}  # the parameter's map: a strip for a 1-D tensor, a block for a 2-D one
MAP_PAD = 0.04
ROLES = {
    TP_SHARD0: "colwise: rows cut by tp, then by shard",
    TP_SHARD1: "rowwise: columns cut by tp, rows by shard",
    TP_REPLICATE: "rowwise bias: the same on every tp rank",
    None: "off the plan: the same on every tp rank",
}


def piece_colors(i: int) -> tuple[tuple, tuple]:
    """(cell, held block) colours of data piece i: tab20's light and dark shades of one hue (8 pieces distinct)."""
    cmap = matplotlib.colormaps["tab20"]
    return cmap(2 * (i % 10) + 1), cmap(2 * (i % 10))


def _placement(layout: Fsdp2Layout, i: int) -> str | None:
    return layout.tp_placements[i] if layout.tp_placements else None


def _cell_text(layout: Fsdp2Layout, name: str, rank: int) -> tuple[str, bool]:
    start, stop = layout.rows(name, rank)
    if stop == start:
        return f"rank {rank}\nempty", True
    cols = layout.cols(name, rank)
    return f"rank {rank}\nrows {start}:{stop}" + (f"\ncols {cols[0]}:{cols[1]}" if cols else ""), False


def _panel_title(layout: Fsdp2Layout, i: int, lines: int) -> str:
    """Name and shape, TP role, torch's placements: on 2 lines, or 3 for panels narrower than the 2-line form."""
    spec = layout.params[i]
    sep = "\n" if lines == 3 else "  "
    placements = ", ".join(layout.placements(spec.name))
    return f"{spec.name} {tuple(spec.shape)}{sep}{ROLES[_placement(layout, i)]}\n({placements})"


def _heading(layout: Fsdp2Layout, title: str | None) -> str:
    R, S, T = layout.dp_replicate, layout.shard_size, layout.tp
    if R > 1:
        mesh = f"{R} × {S} × {T} mesh (replicas × shards × tp), rank = (r·{S} + s)·{T} + t"
    else:
        mesh = f"{S} × {T} mesh (shards × tp), rank = s·{T} + t"
    off = sum(p is None for p in (layout.tp_placements or (None,) * len(layout.params)))
    lines = [
        f"FSDP2 + TP{' + HSDP' if R > 1 else ''}: {layout.world_size} ranks on a {mesh}",
        f"same colour = same data; {off} of {len(layout.params)} parameters are off the TP plan, "
        "whole on every tp rank",
        "each cell's map is the whole parameter (dim 0 down): the rank's rows (and columns) filled, tp's cuts dashed",
    ]
    return "\n".join(([title] if title else []) + lines)


def _draw_map(ax, layout, i, rank, box, dark, segments) -> None:
    """The parameter as a block (dim 0 downwards, dim 1 across), the rank's piece filled, tp's cuts dashed."""
    spec = layout.params[i]
    x, y, w, h = box
    ax.add_patch(
        Rectangle(
            (x, y), w, h, facecolor="white", edgecolor="#555555", linewidth=0.5, gid=f"{spec.name}/rank{rank}/map"
        )
    )
    rows = spec.shape[0] if spec.shape else 1
    start, stop = layout.rows(spec.name, rank)
    cols = layout.cols(spec.name, rank)
    ncols = spec.shape[1] if len(spec.shape) > 1 else 1
    c0, c1 = cols if cols else (0, ncols)
    if stop > start:
        top = y + h * (1 - start / rows)
        held = Rectangle(
            (x + w * c0 / ncols, top - h * (stop - start) / rows),
            w * (c1 - c0) / ncols,
            h * (stop - start) / rows,
            facecolor=dark,
            edgecolor="none",
            gid=f"{spec.name}/rank{rank}/held",
        )
        ax.add_patch(held)
    T, placement = layout.tp, _placement(layout, i)
    for k in range(1, T):
        if placement == TP_SHARD0:
            segments.append([(x, y + h * (1 - k / T)), (x + w, y + h * (1 - k / T))])
        elif placement == TP_SHARD1:
            segments.append([(x + w * k / T, y), (x + w * k / T, y + h)])


def plot_tp_layout(layout: Fsdp2Layout, *, title: str | None = None) -> Figure:
    """Every parameter as a grid of ranks: replicas down, (shard, tp) across; colour = the data a rank holds.

    Each cell names its rank, its rows of dim 0 and (rowwise) its columns, beside a map of the
    whole parameter with the rank's piece filled. Panel titles give the TP role and torch's
    placements, e.g. "(_StridedShard(dim=0, sf=2), Shard(dim=0))". `title` goes above the heading.
    """
    R, S, T = layout.dp_replicate, layout.shard_size, layout.tp
    names = [p.name for p in layout.params]
    texts = {(n, r): _cell_text(layout, n, r) for n in names for r in range(layout.world_size)}
    map_w = max(MAP_W[min(2, max(1, len(p.shape)))] for p in layout.params)
    cell_w = max(0.6, max(inches(t, LABEL_PT) for t, _ in texts.values()) + 0.06 + map_w + MAP_PAD)
    row_head = inches(f"replica {R - 1}", LABEL_PT) + 0.08 if R > 1 else 0.0
    grid_w = S * T * cell_w + (S - 1) * GROUP_GAP

    def packing(lines: int):
        titles = [_panel_title(layout, i, lines) for i in range(len(names))]
        panel_w = max(row_head + grid_w, max(inches(t, PANEL_TITLE_PT) for t in titles))
        return titles, panel_w, max(1, min(len(names), int((WIDTH_IN - 2 * MARGIN + GAP_X) // (panel_w + GAP_X))))

    titles, panel_w, per_line = packing(2)
    if packing(3)[2] > per_line:  # narrow grids: the role on a line of its own puts more panels on a line
        titles, panel_w, per_line = packing(3)
    heading = _heading(layout, title)
    top_h = 0.16 * titles[0].count("\n") + 0.2  # the panel title's lines
    panel_h = top_h + 2 * HEAD_H + R * CELL_H
    fig, ax, width, height, left0, title_h = page(heading, len(names), per_line, panel_w, panel_h)
    cuts: list = []
    for i, name in enumerate(names):
        left = left0 + (i % per_line) * (panel_w + GAP_X)
        top = height - MARGIN - title_h - (i // per_line) * (panel_h + GAP_Y)
        ax.text(left, top, titles[i], ha="left", va="top", fontsize=PANEL_TITLE_PT, fontweight="bold")
        groups_x = [left + row_head + s * (T * cell_w + GROUP_GAP) for s in range(S)]  # each shard group's left
        differs = _placement(layout, i) in (TP_SHARD0, TP_SHARD1)  # else TP peers hold the same data
        spec_map_w = MAP_W[min(2, max(1, len(layout.params[i].shape)))]

        for s in range(S):
            group_mid = groups_x[s] + T * cell_w / 2
            ax.text(group_mid, top - top_h - HEAD_H / 2, f"shard {s}", ha="center", va="center", fontsize=LABEL_PT)
            for t in range(T):
                ax.text(groups_x[s] + (t + 0.5) * cell_w, top - top_h - 1.5 * HEAD_H, f"tp {t}", ha="center",
                        va="center", fontsize=LABEL_PT)  # fmt: skip
        for r in range(R):
            y = top - top_h - 2 * HEAD_H - (r + 1) * CELL_H
            if R > 1:
                ax.text(groups_x[0] - 0.06, y + CELL_H / 2, f"replica {r}", ha="right", va="center", fontsize=LABEL_PT)
            for s in range(S):
                for t in range(T):
                    rank = (r * S + s) * T + t  # torch's row-major mesh numbering, tp last
                    text, empty = texts[(name, rank)]
                    light, dark = piece_colors(s * T + (t if differs else 0))
                    x, gid = groups_x[s] + t * cell_w, f"{name}/rank{rank}"
                    hatch = EMPTY_HATCH if empty else None
                    ax.add_patch(
                        Rectangle((x, y), cell_w, CELL_H, fc=light, ec="#555555", lw=0.6, hatch=hatch, gid=gid)
                    )
                    map_x = x + cell_w - MAP_PAD - (map_w + spec_map_w) / 2  # maps of one figure share a centre
                    _draw_map(ax, layout, i, rank, (map_x, y + 0.05, spec_map_w, CELL_H - 0.1), dark, cuts)
                    ground = dict(facecolor="white", edgecolor="none", alpha=0.85, pad=0.6) if empty else None
                    forms = [(text, 0), ("\n".join(text.split("\n")[:2]), 0), (f"rank {rank}", 0)]
                    box = (x, y, cell_w - map_w - MAP_PAD, CELL_H)
                    FitText(ax, box, forms, gid=gid, bbox=ground)
    ax.add_collection(LineCollection(cuts, colors="#222222", linewidths=0.7, linestyles=(0, (2, 1.5))))
    return fig
