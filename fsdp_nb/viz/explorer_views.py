"""What the explorer shows for one setting: the text under the picture, and the picture.

Kept apart from the widget (`explorer`) so each reads in one sitting. The text gives each
version's verdict and, for every layout shown, its bytes per rank on the chosen mesh: the
number that tells FSDP, HSDP and FSDP + TP apart at one world size (HSDP keeps S-rank
shards on every replica; TP divides the planned layers once more). The picture is the
1-D / HSDP panels side by side, FIGURE_INCHES wide; with tp > 1, the (R, S, T) mesh figure of
`tp_figs`, under a few lines saying why FSDP1 has no TP form [Note: TP layouts].
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

from fsdp_nb.layout.tp_plan import FSDP1_HAS_NO_TP, TP_SHARD0, TP_SHARD1
from fsdp_nb.viz.labels import AREA_INCHES, text_width_pt
from fsdp_nb.viz.layout_figs import draw_fsdp1, draw_fsdp2
from fsdp_nb.viz.mesh_figs import plot_mesh_layout
from fsdp_nb.viz.tables import format_fsdp1

if TYPE_CHECKING:
    from fsdp_nb.viz.explorer import ExplorerSettings

FIGURE_INCHES = (AREA_INCHES, 3.6)
"""Width and height of the redrawn figure, one panel or two."""
MARGINS = (0.95, 0.1, 0.1, 0.55)
"""Inches around each panel's axes (left, right, bottom, top): row labels on the left, titles on top."""
STATIC_DPI = 100
"""The static picture (PNG) is as wide as the output area: 950 px, labels 9.7 px and more."""
NO_TP_FSDP1 = f"{FSDP1_HAS_NO_TP} (fsdp_nb refuses tp_size > 1 with fsdp_version=1)."  # as %fsdp_layout says it


def _verdict(layout, version: int, s: ExplorerSettings) -> str:
    """Plain-text verdict: what torch raises and why, or why it works."""
    if layout.raises:
        first = layout.errors[0]
        return _wrapped(f"FSDP{version}: torch raises {first.when}:\n  {first.raises}\n  why: {first.message}")
    lines = [f"FSDP{version}: works."]
    if s.dp_replicate > 1:
        S = layout.shard_size
        lines.append(f"  HSDP: {s.dp_replicate} replicas of a {S}-rank shard group; each rank holds what its peer in "
                     f"replica 0 holds, so FSDP cuts over {S} ranks, not {s.dp_replicate * S}.")  # fmt: skip
    if version == 2:
        if s.tp > 1:
            lines += [f"  {_tp_role(layout, p.name)}" for p in layout.params if p.name.endswith(".weight")]
        else:
            lines.append("  Each parameter is its own DTensor sharded on dim 0; no FlatParameter to keep uniform.")
        if s.freeze_l1:
            lines.append("  l1's DTensors keep requires_grad=False: no gradient, no optimizer state for them.")
        if s.l2_bf16:
            lines.append(
                "  l2 is bf16 in its own fully_shard group, so its all-gather runs in bf16 apart from "
                "the fp32 layers (the forward still needs matching dtypes, e.g. torch.autocast)."
            )
    lines += [f"  warning: {p.message}" for p in layout.problems if p.severity == "warning"]
    return _wrapped("\n".join(lines))


def _tp_role(layout, name: str) -> str:
    """One line on what TP does to a Linear's weight (and its bias)."""
    module = name.rsplit(".", 1)[0]
    placement = layout.tp_placements[[p.name for p in layout.params].index(name)]
    if placement == TP_SHARD0:
        return f"{module} colwise: TP cuts its rows first, FSDP each TP piece again ({layout.placements(name)[-2]})."
    if placement == TP_SHARD1:
        return f"{module} rowwise: TP cuts its weight's columns (its bias is replicated), FSDP its rows."
    return f"{module} is off the plan: every tp rank holds the same FSDP shard of it."


def _bytes_text(layout, version: int) -> str:
    """Every rank's bytes (real+padding) and the largest against the whole model: what a mesh costs per rank."""
    R, S, T = layout.dp_replicate, layout.shard_size, layout.tp
    mesh = f"{R} × {S} × {T} (replicas × shards × tp)" if T > 1 else f"{R} × {S} (replicas × shards)"
    per = layout.bytes_per_rank
    model = sum(p.numel * p.itemsize for p in layout.params)
    top = max(b.total for b in per)
    ranks = "  ".join(f"r{r}={b.real}+{b.padding}" for r, b in enumerate(per))  # no space inside an entry
    return _wrapped(
        f"FSDP{version} bytes per rank on the {mesh} mesh, real+padding: {ranks}\n"
        f"  largest: {top} B, {top / model:.0%} of the model's {model} B"
    )


def _wrapped(text: str, width: int = 110) -> str:
    """Long lines folded at word boundaries, continuation lines indented under their line's text."""
    out = []
    for line in text.splitlines():
        indent = " " * (len(line) - len(line.lstrip()) + 2)
        out.append(textwrap.fill(line, width, subsequent_indent=indent, break_long_words=False) if line else "")
    return "\n".join(out)


def text_view(s: ExplorerSettings, lay1, lay2) -> str:
    """The verdicts, FSDP1's size line, and every shown layout's bytes per rank."""
    texts = []
    if s.version in ("1", "both") and s.tp > 1:
        texts.append(_wrapped(NO_TP_FSDP1))
    if lay1 is not None:
        texts += [_verdict(lay1, 1, s), format_fsdp1(lay1).split("\n", 1)[0], _bytes_text(lay1, 1)]
    if lay2 is not None:
        texts += [_verdict(lay2, 2, s), _bytes_text(lay2, 2)]
    return "\n\n".join(texts)


def draw_view(s: ExplorerSettings, lay1, lay2, note: str = "") -> Figure:
    """The 1-D / HSDP panels side by side, or under TP the mesh figure with FSDP1's sentence over it."""
    if s.tp == 1:
        panels = [(draw, lay) for draw, lay in ((draw_fsdp1, lay1), (draw_fsdp2, lay2)) if lay is not None]
        return _panels_figure(panels, "\n".join(filter(None, [note, _hsdp_note(s)])))
    lines = ([note] if note else []) + ([NO_TP_FSDP1] if s.version in ("1", "both") else [])
    fig = Figure(figsize=(AREA_INCHES, 0.1), dpi=STATIC_DPI) if lay2 is None else plot_mesh_layout(lay2)
    fig.set_dpi(STATIC_DPI)
    return _lines_over(fig, lines)


def _hsdp_note(s: ExplorerSettings) -> str:
    if s.dp_replicate == 1:
        return ""
    S = s.world_size // s.dp_replicate
    return f"HSDP: {s.dp_replicate} replicas × {S} shards; rank r·{S} + s holds what rank s holds"


def _lines_over(fig: Figure, lines) -> Figure:
    """`fig` grown at the top by room for `lines` (9 pt, grey, gid "note"), folded to its width; its axes keep
    their size in inches."""
    if not lines:
        return fig
    width, height = fig.get_size_inches()
    for chars in range(120, 30, -5):  # the longest folding whose lines fit (Agg draws ~6 % wider than the metrics)
        folded = [part for line in lines for part in textwrap.wrap(line, chars, break_long_words=False)]
        if max(text_width_pt(part, 9) for part in folded) * 1.06 / 72 <= width - 0.2:
            break
    lines = folded
    extra = 0.1 + 0.2 * len(lines)
    for ax in fig.axes:
        x0, y0, w, h = ax.get_position().bounds
        ax.set_position((x0, y0 * height / (height + extra), w, h * height / (height + extra)))
    fig.set_size_inches(width, height + extra)
    fig.text(0.5, 1 - 0.08 / (height + extra), "\n".join(lines), ha="center", va="top", fontsize=9,
             color="#444444", gid="note")  # fmt: skip
    return fig


def _panels_figure(panels, note: str = "") -> Figure:
    """Panels side by side in the output area's width; `note` is a line (or lines) over them."""
    width, height = FIGURE_INCHES
    left, right, bottom, top = MARGINS
    extra = 0.3 + 0.2 * (len(note.split("\n")) - 1) if note else 0.0  # 0.3 in for the one line of a 1-D picture
    top += extra
    height += extra
    # Fixed axes positions: constrained layout would cost a second full draw per change.
    fig = Figure(figsize=(width, height), dpi=STATIC_DPI)
    each = width / len(panels)
    for k, (draw, layout) in enumerate(panels):
        rect = ((k * each + left) / width, bottom / height, (each - left - right) / width, 1 - (top + bottom) / height)
        draw(fig.add_axes(rect), layout, compact=True)
    if note:
        fig.text(0.5, 1 - 0.08 / height, note, ha="center", va="top", fontsize=9, color="#444444", gid="note")
    return fig
