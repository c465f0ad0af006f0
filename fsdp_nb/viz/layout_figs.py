"""Figures of where parameters live: FSDP1's flat chunks, FSDP2's row shards, side by side.

Pure functions from a layout to a `matplotlib.figure.Figure` (no pyplot state).
Every drawn patch carries a gid so tests can read the picture back:
"flat/<name>" on FSDP1's unsharded bar, "rank<r>/<name>" for a rank's data,
"rank<r>/padding" (FSDP1) or "rank<r>/padding:<name>" (FSDP2) for hatched padding.
A piece's label (a `FitText` with the piece's gid) shows the first of its forms, most
informative first, that fits inside the piece, or nothing: the legend names the slivers.
Labels are 7 pt or more (9.7 px at 100 dpi): these figures are at most 9.5 in wide, so a
notebook shows them at their own size.
"""

from __future__ import annotations

import textwrap

import matplotlib
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.transforms import blended_transform_factory

from fsdp_nb.layout import Fsdp1Layout, Fsdp2Layout
from fsdp_nb.viz.labels import LABEL_PT, FitText, legend_grid, text_width_pt

PAD_HATCH = "///"
PAD_FACE = "#f2f2f2"
BAND_FACE = ("#fafafa", "#eeeeee")  # alternating rank bands
_FSDP2_TITLE = "FSDP2: dim 0 of each parameter split across ranks"


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


def _label(ax: Axes, box, forms, gid, *, boxed: bool = False, alpha: float = 1.0) -> FitText:
    """A label inside `box` (x, y, width, height): the first of `forms` that fits, or none.
    `boxed` puts the text on a white ground, for labels that lie over other drawing."""
    ground = dict(facecolor="white", edgecolor="none", alpha=0.85, pad=0.6) if boxed else None
    return FitText(ax, box, forms, gid=gid, alpha=alpha, bbox=ground)


def _piece_forms(name: str, start: int, stop: int) -> list[tuple[str, float]]:
    """FSDP1 piece labels, most informative first: name and range, a long name folded at a dot, the name alone,
    and turned upright for a narrow piece of a tall row."""
    elements = f"[{start}:{stop}]"
    dots = [i for i, c in enumerate(name) if c == "."]
    cut = min(dots, key=lambda i: abs(2 * i - len(name))) + 1 if len(dots) > 1 else None
    folded = f"{name[:cut]}\n{name[cut:]}" if cut else name
    forms = [(f"{name}\n{elements}", 0), (f"{name} {elements}", 0), (f"{folded}\n{elements}", 0), (name, 0)]
    forms += [(folded, 0), (f"{name}\n{elements}", 90), (name, 90)]
    return forms


def _legend_handles(colors: dict) -> list[Patch]:
    handles = [Patch(facecolor=c, edgecolor="#555555", label=n) for n, c in colors.items()]
    handles.append(Patch(facecolor=PAD_FACE, edgecolor="#555555", hatch=PAD_HATCH, label="padding"))
    return handles


def _legend(ax: Axes, colors: dict) -> None:
    """Right of the axes, outside the data; a second column past 16 entries."""
    handles = _legend_handles(colors)
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=LABEL_PT,
        frameon=False,
        ncols=-(-len(handles) // 16),
    )


def _figure_legend(fig: Figure, colors: dict, columns: int) -> None:
    """Under the whole figure, in `columns` (from `legend_grid`, which also gave the height to leave for it)."""
    fig.legend(
        handles=_legend_handles(colors), loc="outside lower center", ncols=columns, fontsize=LABEL_PT, frameon=False
    )


def _rejected(ax: Axes, layout) -> float:
    """Banner for configurations torch refuses; returns the alpha to draw the layout with."""
    if layout.raises is None:
        return 1.0
    # Folded to fit the narrowest axes it is drawn on (an explorer panel, ~3.7 in): it stays off the row labels.
    message = textwrap.fill(layout.raises, 56, break_long_words=False)
    ax.text(
        0.5,
        0.5,
        f"torch raises {layout.errors[0].when}:\n{message}",
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=8,
        color="#b00020",
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


def draw_fsdp1(ax: Axes, layout: Fsdp1Layout, *, compact: bool = False, legend: bool = True) -> None:
    """Top: the unsharded FlatParameter (params, then padding) with the rank cuts; below: each rank's chunk.

    `compact` (the explorer) drops the legend and the element axis, which cost more to draw than the data.
    `legend=False` leaves the legend to the caller (the `plot_*` functions put one under the figure).
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
    shards = layout.shard_size  # HSDP: rank r holds chunk r % S, as its peer in the first replica does
    for r in range(1, shards):  # where torch.chunk cuts the FlatParameter
        ax.plot([r * chunk, r * chunk], [world + 0.5, world + 1.5], color="#b00020", linestyle="--", linewidth=1)
    _row_label(ax, world + 1.0, "FlatParameter")
    # Rank rows, rank 0 on top; each chunk sits under the flat elements [r * chunk, (r + 1) * chunk) it holds.
    for r in range(world):
        y = world - 1 - r
        ax.axhspan(y, y + 1, facecolor=BAND_FACE[r % 2], zorder=0)
        _row_label(ax, y + 0.5, f"rank {r}")
        x = (r % shards) * chunk
        for seg in layout.segments(r):
            gid = f"rank{r}/{seg.name or 'padding'}"
            _rect(ax, x, y + 0.15, seg.numel, 0.7, colors.get(seg.name), gid, padding=seg.name is None, alpha=alpha)
            if seg.name is not None:
                _label(ax, (x, y + 0.15, seg.numel, 0.7), _piece_forms(seg.name, seg.start, seg.stop), gid, alpha=alpha)
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
        if legend:
            _legend(ax, colors)


def draw_fsdp2(ax: Axes, layout: Fsdp2Layout, *, compact: bool = False, legend: bool = True) -> None:
    """One column per rank; each parameter's rows on that rank, padding rows hatched below them.

    Every row of shards is named at its left, so the legend only explains the hatching;
    `compact` drops it, and the per-shard labels beyond 4 ranks; `legend=False` leaves it to the caller.
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
                    forms = [(f"[{start}:{stop}]\n{shape}", 0), (f"[{start}:{stop}]", 0)]
                    # A label may reach across its rank's column, empty beside a narrow piece. A 1-row shard
                    # is shorter than its two-line label: centre it on the padded block, on white.
                    fits = local >= 2 or height == local
                    box = (r + 0.03, top - local, 0.94, local) if fits else (r + 0.03, y, 0.94, height)
                    _label(ax, box, forms, gid, boxed=not fits, alpha=alpha)
            if height > local:
                gid = f"rank{r}/padding:{spec.name}"
                _rect(ax, x, y, width, height - local, None, gid, padding=True, alpha=alpha)
                if labels and not local:  # over the hatching: on white
                    empty = [(f"empty\n{(0,) + spec.shape[1:]}", 0), ("empty", 0)]
                    _label(ax, (r + 0.03, y, 0.94, height), empty, gid, boxed=True, alpha=alpha)
        _row_label(ax, y + height / 2, spec.name)
        y += height + 0.6
    for r in range(world):
        ax.axvspan(r, r + 1, facecolor=BAND_FACE[r % 2], zorder=0)
        _col_label(ax, r + 0.5, f"rank {r}")
    ax.set_xlim(0, world)
    ax.set_ylim(-0.3, y)
    ax.set_axis_off()
    ax.set_title(_FSDP2_TITLE, fontsize=9, pad=18)
    if legend and not compact:
        ax.legend(
            handles=_legend_handles({}), loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=LABEL_PT, frameon=False
        )


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _fsdp2_height(layout: Fsdp2Layout) -> float:
    """Inches for FSDP2's rows: enough that the smallest shard holds a two-line label (0.3 in), at least
    0.12 in a row; big models are capped by the callers, and their rows shrink (labels then drop)."""
    per_row = max(0.12, 0.3 / min(layout.padded_rows))
    return per_row * (sum(layout.padded_rows) + 0.6 * len(layout.params) + 0.3)


def _names(layout) -> list[str]:
    return [s.name for s in layout.params] + ["padding"]


def plot_fsdp1(layout: Fsdp1Layout) -> Figure:
    """The FlatParameter, its padding and the cut into equal rank chunks."""
    width = 9.0
    columns, legend_height = legend_grid(_names(layout), width)
    fig = _new_figure(width, 1.2 + 0.55 * (layout.world_size + 1.5) + legend_height)
    draw_fsdp1(fig.add_subplot(), layout, legend=False)
    _figure_legend(fig, param_colors([s.name for s in layout.params]), columns)
    return fig


def plot_fsdp2(layout: Fsdp2Layout) -> Figure:
    """Every weight and bias split by rows across ranks, uneven and empty shards included."""
    names = max(text_width_pt(s.name, 8) for s in layout.params) / 72  # the row labels, left of the axes
    title = 1.05 * text_width_pt(_FSDP2_TITLE, 9) / 72  # (Agg draws a few % wider than the font's metrics)
    width = min(9.2, max(names + 1.1 * layout.world_size + 1.0, title + 0.3))
    fig = _new_figure(width, min(10.0, 1.5 + _fsdp2_height(layout)))
    ax = fig.add_subplot()
    draw_fsdp2(ax, layout)
    ax.set_title("")
    fig.suptitle(_FSDP2_TITLE, fontsize=9)  # centred on the figure, made wider than the title
    return fig


def plot_comparison(fsdp1: Fsdp1Layout, fsdp2: Fsdp2Layout) -> Figure:
    """FSDP1 above FSDP2, for the same parameters and world size, in a notebook's width (about 950 px)."""
    if fsdp1.world_size != fsdp2.world_size:
        raise ValueError(f"plot_comparison: world sizes differ ({fsdp1.world_size} vs {fsdp2.world_size})")
    if {s.name for s in fsdp1.params} != {s.name for s in fsdp2.params}:
        raise ValueError("plot_comparison: the two layouts describe different parameters")
    width = 9.2
    columns, legend_height = legend_grid(_names(fsdp1), width)
    rows = min(8.0, _fsdp2_height(fsdp2))  # big models: rows shrink instead of the figure growing
    top_height = 0.55 * (fsdp1.world_size + 1.5)
    fig = _new_figure(width, 1.6 + top_height + max(rows, 2.5) + legend_height)
    top, bottom = fig.subplots(2, 1, height_ratios=[top_height, max(rows, 2.5)])
    draw_fsdp1(top, fsdp1, legend=False)
    draw_fsdp2(bottom, fsdp2, legend=False)
    # one legend for both: a parameter has the same colour above and below
    _figure_legend(fig, param_colors([s.name for s in fsdp1.params]), columns)
    fig.suptitle(f"Same {len(fsdp1.params)} parameters on {fsdp1.world_size} ranks", fontsize=10)
    return fig
