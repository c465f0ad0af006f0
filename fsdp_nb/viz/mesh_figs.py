"""Figures of a layout on its (R, S) device mesh: per parameter, a grid of ranks with replicas in matching colours.

Pure functions from a layout to a `matplotlib.figure.Figure`. Each FSDP2 parameter (or the
one FSDP1 FlatParameter) gets a panel: R rows (replicas) by S columns (shard index), the cell
of global rank r·S + s labelled with the rank and the rows (FSDP2) or flat elements (FSDP1) it
holds [Note: N-D layouts]. A cell's colour is its shard index, so the R cells of a column, which
hold the same bytes, share it. Every cell patch has gid "<name>/rank<r>" (FSDP1: "flat/rank<r>").

The figure is laid out by hand in inches on one full-figure axes (the page of `grid`): panels are as
wide as their widest label needs, as many to a line as fit 9.4 in, so it is shown at its own size in
a notebook's ~950 px output area and every label is 7 pt (9.7 px) or more. A layout with tensor
parallelism is drawn by `tp_figs` instead, on its (R, S, T) mesh.
"""

from __future__ import annotations

import matplotlib
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from fsdp_nb.layout import Fsdp1Layout, Fsdp2Layout
from fsdp_nb.viz.grid import EMPTY_HATCH, GAP_X, GAP_Y, MARGIN, PANEL_TITLE_PT, WIDTH_IN, inches, page
from fsdp_nb.viz.labels import LABEL_PT, FitText
from fsdp_nb.viz.tp_figs import plot_tp_layout

CELL_H = 0.36  # two 7 pt lines with a point of room
HEAD_H = 0.18  # the "shard s" headers above a panel's columns


def shard_color(s: int) -> tuple:
    """The colour of shard index s: tab20's light shades, one per shard (S <= 10 are all distinct)."""
    return matplotlib.colormaps["tab20"](2 * (s % 10) + 1)


def _panels(layout) -> list[tuple[str, str, list[tuple[str, bool]]]]:
    """(gid prefix, panel title, per rank (label, empty)) for each panel of the layout."""
    ranks = range(layout.world_size)
    if isinstance(layout, Fsdp1Layout):
        chunk = layout.chunk_numel
        title = f"FlatParameter: {layout.total_numel} elements + {layout.padding_numel} padding, {chunk} per rank"
        cells = [
            (f"rank {r}\n[{(r % layout.shard_size) * chunk}:{(r % layout.shard_size + 1) * chunk}]", False)
            for r in ranks
        ]
        return [("flat", title, cells)]
    panels = []
    for spec in layout.params:
        cells = []
        for r in ranks:
            start, stop = layout.rows(spec.name, r)
            cells.append((f"rank {r}\nrows {start}:{stop}" if stop > start else f"rank {r}\nempty", stop == start))
        panels.append((spec.name, f"{spec.name} {tuple(spec.shape)}", cells))
    return panels


def _title(layout, title: str | None) -> str:
    R, S = layout.dp_replicate, layout.shard_size
    kind = "HSDP" if R > 1 else "1-D mesh"
    head = f"FSDP{layout.version} {kind}: {layout.world_size} ranks on a {R} × {S} mesh (replicas × shards)"
    placements = {layout.placements(s.name) for s in layout.params}  # one FSDP mesh: the same for every parameter
    line = f"placements {', '.join('(' + ', '.join(p) + ')' for p in sorted(placements))}; same colour = same shard"
    return "\n".join(([title] if title else []) + [head, line])


def plot_mesh_layout(layout: Fsdp1Layout | Fsdp2Layout, *, title: str | None = None) -> Figure:
    """Every parameter (FSDP1: the FlatParameter) as an R × S grid of ranks; replicas of a shard share its colour.

    Rows are replicas, columns shard indices; each cell names its rank and the rows (FSDP2) or
    flat elements (FSDP1) it holds. `title` goes above the mesh and placements lines. A layout
    with tensor parallelism (tp > 1) is drawn by `tp_figs.plot_tp_layout`, on its (R, S, T) mesh.
    """
    if layout.tp > 1:
        return plot_tp_layout(layout, title=title)
    R, S = layout.dp_replicate, layout.shard_size
    panels = _panels(layout)
    heading = _title(layout, title)
    labels = [text for _, _, cells in panels for text, _ in cells]
    cell_w = max(0.6, max(inches(t, LABEL_PT) for t in labels) + 0.12)
    row_head = inches(f"replica {R - 1}", LABEL_PT) + 0.08
    panel_w = max(row_head + S * cell_w, max(inches(t, PANEL_TITLE_PT) for _, t, _ in panels))
    per_line = max(1, min(len(panels), int((WIDTH_IN - 2 * MARGIN + GAP_X) // (panel_w + GAP_X))))
    panel_h = 0.24 + HEAD_H + R * CELL_H
    fig, ax, width, height, left0, title_h = page(heading, len(panels), per_line, panel_w, panel_h)
    for i, (name, panel_title, cells) in enumerate(panels):
        left = left0 + (i % per_line) * (panel_w + GAP_X)
        top = height - MARGIN - title_h - (i // per_line) * (panel_h + GAP_Y)
        ax.text(left, top, panel_title, ha="left", va="top", fontsize=PANEL_TITLE_PT, fontweight="bold")
        x0 = left + row_head
        for s in range(S):
            ax.text(x0 + (s + 0.5) * cell_w, top - 0.24 - HEAD_H / 2, f"shard {s}", ha="center", va="center",
                    fontsize=LABEL_PT)  # fmt: skip
        for r in range(R):
            y = top - 0.24 - HEAD_H - (r + 1) * CELL_H
            ax.text(x0 - 0.06, y + CELL_H / 2, f"replica {r}", ha="right", va="center", fontsize=LABEL_PT)
            for s in range(S):
                rank = r * S + s  # torch's row-major mesh numbering
                text, empty = cells[rank]
                box = (x0 + s * cell_w, y, cell_w, CELL_H)
                gid = f"{name}/rank{rank}"
                ax.add_patch(
                    Rectangle(
                        box[:2],
                        cell_w,
                        CELL_H,
                        facecolor=shard_color(s),
                        edgecolor="#555555",
                        linewidth=0.6,
                        hatch=EMPTY_HATCH if empty else None,
                        gid=gid,
                    )  # fmt: skip
                )
                ground = dict(facecolor="white", edgecolor="none", alpha=0.85, pad=0.6) if empty else None
                FitText(ax, box, [(text, 0), (f"rank {rank}", 0)], gid=gid, bbox=ground)
    return fig


def plot_layout(fsdp1: Fsdp1Layout | None, fsdp2: Fsdp2Layout, name: str) -> Figure:
    """What `%fsdp_layout NAME` draws for a module read from the ranks (the version with `observed_ranks`).

    On a 1-D mesh, FSDP1 above FSDP2 (one of them modelled); on an HSDP or TP mesh, the grid of ranks
    of the version read from the ranks (under TP `fsdp1` is None: FSDP1 has no such form).
    """
    from fsdp_nb.viz.layout_figs import plot_comparison

    real = fsdp1 if fsdp1 is not None and fsdp1.observed_ranks else fsdp2
    if real.dp_replicate > 1 or real.tp > 1:
        return plot_mesh_layout(real, title=f"{name}: read from the ranks")
    fig = plot_comparison(fsdp1, fsdp2)
    which = "FSDP1 (read from the ranks) | FSDP2 (modelled)" if fsdp1.observed_ranks else (
        "FSDP1 (modelled) | FSDP2 (read from the ranks)"
    )  # fmt: skip
    fig.suptitle(f"{name} on {fsdp1.world_size} ranks: {which}", fontsize=10)
    return fig
