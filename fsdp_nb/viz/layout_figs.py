"""Figures of where parameters live: FSDP1's flat chunks, FSDP2's row shards, side by side.

Pure functions from a layout to a `matplotlib.figure.Figure` (no pyplot state).
Every drawn patch carries a gid so tests can read the picture back:
"flat/<name>" on FSDP1's unsharded bar, "rank<r>/<name>" for a rank's data,
"rank<r>/padding" (FSDP1) or "rank<r>/padding:<name>" (FSDP2) for hatched padding.
"""

from __future__ import annotations

import matplotlib
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.transforms import blended_transform_factory

from fsdp_nb.layout import Fsdp1Layout, Fsdp2Layout

PAD_HATCH = "///"
PAD_FACE = "#f2f2f2"
BAND_FACE = ("#fafafa", "#eeeeee")  # alternating rank bands


def param_colors(names) -> dict[str, tuple]:
    """A stable colour per parameter, in parameter order."""
    cmap = matplotlib.colormaps["tab20" if len(names) > 10 else "tab10"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def _rect(ax: Axes, x, y, w, h, color, gid, *, padding=False, alpha=1.0) -> Rectangle:
    patch = Rectangle(
        (x, y),
        w,
        h,
        facecolor=PAD_FACE if padding else color,
        edgecolor="#555555",
        hatch=PAD_HATCH if padding else None,
        linewidth=0.6,
        gid=gid,
        alpha=alpha,
    )
    ax.add_patch(patch)
    return patch


def _label(ax: Axes, x, y, text, width, span, gid, *, boxed: bool = False):
    """Write inside a box; narrow boxes get small, rotated text, and the narrowest none at all
    (rotated labels of neighbouring slivers would run into each other; the legend names them).
    `boxed` puts the text on a white ground, for labels that lie over other drawing."""
    if width < 0.03 * span:
        return
    narrow = width < 0.12 * span
    ax.text(
        x,
        y,
        text,
        ha="center",
        va="center",
        fontsize=6 if narrow else 7,
        rotation=90 if narrow else 0,
        gid=gid,
        clip_on=True,
        bbox=dict(facecolor="white", edgecolor="none", alpha=0.85, pad=0.6) if boxed else None,
    )


def _legend(ax: Axes, colors: dict) -> None:
    handles = [Patch(facecolor=c, edgecolor="#555555", label=n) for n, c in colors.items()]
    handles.append(Patch(facecolor=PAD_FACE, edgecolor="#555555", hatch=PAD_HATCH, label="padding"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)


def _rejected(ax: Axes, layout) -> float:
    """Banner for configurations torch refuses; returns the alpha to draw the layout with."""
    if layout.raises is None:
        return 1.0
    ax.text(
        0.5,
        0.5,
        f"torch raises {layout.errors[0].when}:\n{layout.raises}",
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=8,
        color="#b00020",
        wrap=True,
        gid="rejected",
        bbox=dict(facecolor="white", edgecolor="#b00020"),
        zorder=10,
    )
    return 0.25


def _row_label(ax: Axes, y: float, text: str) -> None:
    """A label left of the axes at data height y (cheaper than tick machinery)."""
    ax.text(
        -0.01,
        y,
        text,
        transform=blended_transform_factory(ax.transAxes, ax.transData),
        ha="right",
        va="center",
        fontsize=8,
    )


def _col_label(ax: Axes, x: float, text: str) -> None:
    ax.text(
        x,
        1.01,
        text,
        transform=blended_transform_factory(ax.transData, ax.transAxes),
        ha="center",
        va="bottom",
        fontsize=8,
    )


def draw_fsdp1(ax: Axes, layout: Fsdp1Layout, *, compact: bool = False) -> None:
    """Top: the unsharded FlatParameter (params, then padding) with the rank cuts; below: each rank's chunk.

    `compact` (the explorer) drops the legend and the element axis, which cost more to draw than the data.
    """
    colors = param_colors([s.name for s in layout.params])
    alpha = _rejected(ax, layout)
    chunk, world = layout.chunk_numel, layout.world_size
    span = layout.padded_numel
    # Row "flat" (y = world + 0.6): params and alignment padding, then shard padding up to world * chunk.
    x = 0
    flat = list(layout.flat)
    flat_total = sum(s.numel for s in flat)
    if span > flat_total:
        flat.append(type(flat[0])(None, 0, span - flat_total))
    for seg in flat:
        _rect(
            ax,
            x,
            world + 0.6,
            seg.numel,
            0.8,
            colors.get(seg.name),
            f"flat/{seg.name or 'padding'}",
            padding=seg.name is None,
            alpha=alpha,
        )
        x += seg.numel
    for r in range(1, world):  # where torch.chunk cuts the FlatParameter
        ax.plot([r * chunk, r * chunk], [world + 0.5, world + 1.5], color="#b00020", linestyle="--", linewidth=1)
    _row_label(ax, world + 1.0, "FlatParameter")
    # Rank rows, rank 0 on top; each chunk sits under the flat elements [r * chunk, (r + 1) * chunk) it holds.
    for r in range(world):
        y = world - 1 - r
        ax.axhspan(y, y + 1, facecolor=BAND_FACE[r % 2], zorder=0)
        _row_label(ax, y + 0.5, f"rank {r}")
        x = r * chunk
        for seg in layout.segments(r):
            gid = f"rank{r}/{seg.name or 'padding'}"
            _rect(ax, x, y + 0.15, seg.numel, 0.7, colors.get(seg.name), gid, padding=seg.name is None, alpha=alpha)
            if seg.name is not None:
                _label(ax, x + seg.numel / 2, y + 0.5, f"{seg.name}\n[{seg.start}:{seg.stop}]", seg.numel, span, gid)
            x += seg.numel
    ax.set_xlim(0, span)
    ax.set_ylim(0, world + 1.5)
    ax.set_title(
        f"FSDP1: {layout.total_numel} elements + {layout.padding_numel} padding = {layout.padded_numel}, "
        f"{chunk} per rank",
        fontsize=9,
    )
    if compact:
        ax.set_axis_off()
    else:
        ax.set_yticks([])
        ax.set_xlabel("element of the flat parameter")
        _legend(ax, colors)


def draw_fsdp2(ax: Axes, layout: Fsdp2Layout, *, compact: bool = False) -> None:
    """One column per rank; each parameter's rows on that rank, padding rows hatched below them.

    `compact` drops the legend, and the per-shard labels beyond 4 ranks.
    """
    colors = param_colors([s.name for s in layout.params])
    alpha = _rejected(ax, layout)
    world = layout.world_size
    labels = not compact or world <= 4
    widest = max(max(s.numel // max(s.shape[0], 1), 1) for s in layout.params)
    y = 0.0
    for i, spec in reversed(list(enumerate(layout.params))):  # first parameter on top
        height = layout.padded_rows[i]
        row_numel = spec.numel // spec.shape[0] if spec.shape else 1
        width = max(0.15, 0.85 * row_numel / widest)
        for r in range(world):
            start, stop = layout.row_ranges[i][r]
            x = r + (1 - width) / 2
            local = stop - start
            top = y + height  # a shard's rows fill its padded block from the top
            if local:
                gid = f"rank{r}/{spec.name}"
                _rect(ax, x, top - local, width, local, colors[spec.name], gid, alpha=alpha)
                if labels:
                    shape = (local,) + spec.shape[1:]
                    # a 1-row shard is shorter than its two-line label: centre it on the padded block, on white
                    fits = local >= 2 or height == local
                    label_y = top - local / 2 if fits else y + height / 2
                    _label(ax, r + 0.5, label_y, f"[{start}:{stop}]\n{shape}", width, 1, gid, boxed=not fits)
            if height > local:
                gid = f"rank{r}/padding:{spec.name}"
                _rect(ax, x, y, width, height - local, None, gid, padding=True, alpha=alpha)
                if labels and not local:
                    _label(ax, r + 0.5, y + height / 2, f"empty\n{(0,) + spec.shape[1:]}", width, 1, gid)
        _row_label(ax, y + height / 2, spec.name)
        y += height + 0.6
    for r in range(world):
        ax.axvspan(r, r + 1, facecolor=BAND_FACE[r % 2], zorder=0)
        _col_label(ax, r + 0.5, f"rank {r}")
    ax.set_xlim(0, world)
    ax.set_ylim(-0.3, y)
    ax.set_axis_off()
    ax.set_title("FSDP2: dim 0 of each parameter split across ranks", fontsize=9, pad=18)
    if not compact:
        _legend(ax, colors)


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def plot_fsdp1(layout: Fsdp1Layout) -> Figure:
    """The FlatParameter, its padding and the cut into equal rank chunks."""
    fig = _new_figure(9, 1.2 + 0.55 * (layout.world_size + 1.5))
    draw_fsdp1(fig.add_subplot(), layout)
    return fig


def plot_fsdp2(layout: Fsdp2Layout) -> Figure:
    """Every weight and bias split by rows across ranks, uneven and empty shards included."""
    fig = _new_figure(min(9.2, 2.5 + 1.1 * layout.world_size), min(10.0, 1.5 + 0.18 * sum(layout.padded_rows)))
    draw_fsdp2(fig.add_subplot(), layout)
    return fig


def plot_comparison(fsdp1: Fsdp1Layout, fsdp2: Fsdp2Layout) -> Figure:
    """FSDP1 above FSDP2, for the same parameters and world size, in a notebook's width (about 950 px)."""
    if fsdp1.world_size != fsdp2.world_size:
        raise ValueError(f"plot_comparison: world sizes differ ({fsdp1.world_size} vs {fsdp2.world_size})")
    if {s.name for s in fsdp1.params} != {s.name for s in fsdp2.params}:
        raise ValueError("plot_comparison: the two layouts describe different parameters")
    rows = min(8.0, 0.18 * sum(fsdp2.padded_rows))  # big models: rows shrink instead of the figure growing
    top_height = 0.55 * (fsdp1.world_size + 1.5)
    fig = _new_figure(9.2, 1.6 + top_height + max(rows, 2.5))
    top, bottom = fig.subplots(2, 1, height_ratios=[top_height, max(rows, 2.5)])
    draw_fsdp1(top, fsdp1)
    draw_fsdp2(bottom, fsdp2)
    fig.suptitle(f"Same {len(fsdp1.params)} parameters on {fsdp1.world_size} ranks", fontsize=10)
    return fig
