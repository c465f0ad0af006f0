"""Every label readable in a 950 px output area: its size on screen, no overlaps, nothing cut off, legends off the data.

JupyterLab with the file browser open leaves about 950 px for output. A PNG is shown at
its pixel size (inches x dpi; 100 dpi, as the inline backend draws) and scaled down when
wider; the explorer's SVG is scaled to the output's width. So a label is
    font size (pt) x dpi / 72 x min(1, 950 / width in px)        in a PNG,
    font size (SVG units) x 950 / viewBox width                    in the SVG,
and must be 9 px or more. Positions are the Agg renderer's text extents, in the figure's final layout.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import re
from dataclasses import dataclass
from unittest.mock import patch

import numpy as np
import pytest
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cbook import STEP_LOOKUP_MAP
from matplotlib.figure import Figure
from matplotlib.path import Path
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from fsdp_nb.layout import RankBytes, fsdp1_layout, fsdp2_layout, specs_of
from fsdp_nb.layout.memory import MemoryReport
from fsdp_nb.models import GPT, GPTConfig, Layer
from fsdp_nb.trace import RankTrace, Span, Trace
from fsdp_nb.viz import plot_comparison, plot_fsdp1, plot_fsdp2, plot_memory, plot_timeline
from fsdp_nb.viz.explorer import Explorer, ExplorerSettings, render, svg_markup
from fsdp_nb.viz.labels import FitText

AREA_PX = 950
DPI = 100
MIN_PX = 9.0
WORLDS = range(1, 9)
MODELS = {"Layer": lambda: specs_of(Layer()), "GPT": lambda: specs_of(GPT(GPTConfig.debug()))}


# ---- reading a figure back ---------------------------------------------------------------------------------------
@dataclass
class Drawn:
    text: Text
    extent: Bbox
    """Where it was drawn, in the drawing's pixels."""
    limits: list[Bbox]
    """What it must stay inside: the figure; its clip box if clipped; for a FitText its box and its axes."""


def _limits(text: Text) -> list[Bbox]:
    limits = [text.figure.bbox.frozen()]
    if text.get_clip_on() and text.get_clip_box() is not None:
        limits.append(text.get_clip_box().frozen())
    if text.get_gid() == "rejected":  # torch's refusal, over the picture: inside the axes, off the row labels
        limits.append(text.axes.bbox.frozen())
    if isinstance(text, FitText):
        x0, y0, width, height = text.box
        ax = text.axes
        corners = ax.transData.transform([(x0, y0), (x0 + width, min(y0 + height, max(ax.get_ylim())))])
        limits += [Bbox(corners), ax.bbox.frozen()]
    return limits


def drawn_texts(fig: Figure, fmt: str = "png") -> list[Drawn]:
    """Every Text the figure's draw really draws (visible, not empty), in its final layout: as the Agg renderer
    lays it out for a PNG, or (fmt="svg") as the SVG renderer does, whose text metrics the explorer's labels use."""
    FigureCanvasAgg(fig)
    seen = []
    draw = Text.draw

    def recording(self, renderer):
        draw(self, renderer)
        if self.get_visible() and self.get_text().strip():  # FitText has chosen its form (or "") by now
            seen.append(Drawn(self, self.get_window_extent(renderer), _limits(self)))

    with patch.object(Text, "draw", recording):
        if fmt == "svg":
            with rc_context({"svg.fonttype": "none"}):
                fig.savefig(io.StringIO(), format="svg")
        else:
            fig.draw_without_rendering()  # layout and text metrics, without rasterizing
    return seen


def shown_px(fig: Figure, text: Text) -> float:
    """The label's font size on screen in a 950 px output area, for the figure as a PNG at its dpi."""
    width_px = fig.get_size_inches()[0] * fig.dpi
    return text.get_fontsize() * fig.dpi / 72 * min(1.0, AREA_PX / width_px)


def overlapping(seen: list[Drawn], slack: float = 1.0) -> list[tuple[str, str]]:
    """Pairs of labels whose extents overlap by more than `slack` pixels both ways."""
    boxes = np.array([[d.extent.x0, d.extent.y0, d.extent.x1, d.extent.y1] for d in seen]).reshape(-1, 4)
    w = np.minimum(boxes[:, None, 2], boxes[None, :, 2]) - np.maximum(boxes[:, None, 0], boxes[None, :, 0])
    h = np.minimum(boxes[:, None, 3], boxes[None, :, 3]) - np.maximum(boxes[:, None, 1], boxes[None, :, 1])
    i, j = np.nonzero(np.triu((w > slack) & (h > slack), k=1))
    pairs = [(seen[a].text, seen[b].text) for a, b in zip(i, j)]
    # torch's refusal is a banner laid over the (faded) picture and its labels on purpose
    return [(a.get_text(), b.get_text()) for a, b in pairs if not _banner_over_label(a, b)]


def _banner_over_label(a: Text, b: Text) -> bool:
    return any(x.get_gid() == "rejected" and isinstance(y, FitText) for x, y in ((a, b), (b, a)))


def cut_off(seen: list[Drawn], slack: float = 1.0) -> list[str]:
    """Labels reaching outside the figure, their clip box, or (FitText) their own box or axes."""
    return [
        d.text.get_text()
        for d in seen
        if any(
            d.extent.x0 < lim.x0 - slack
            or d.extent.x1 > lim.x1 + slack
            or d.extent.y0 < lim.y0 - slack
            or d.extent.y1 > lim.y1 + slack
            for lim in d.limits
        )
    ]


def legend_hits(fig: Figure) -> list[str]:
    """Data (lines, patches) that a legend's extent covers, in display coordinates, in the figure's last layout."""
    renderer = fig.canvas.get_renderer()
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert legends, "this figure has no legend to check"
    hits = []
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            for line in ax.lines:
                x, y = line.get_xdata(), line.get_ydata()
                if line.get_drawstyle() in STEP_LOOKUP_MAP and line.get_drawstyle() != "default":
                    x, y = STEP_LOOKUP_MAP[line.get_drawstyle()](x, y)  # the steps as drawn, not the points
                path = line.get_transform().transform_path(Path(np.column_stack([x, y])))
                if path.intersects_bbox(box, filled=False):
                    hits.append(f"line {line.get_label()}")
            hits += [f"patch {p.get_gid()}" for p in ax.patches if p.get_window_extent(renderer).overlaps(box)]
    return hits


# ---- the figures -------------------------------------------------------------------------------------------------
@functools.cache
def specs(model: str):
    return MODELS[model]()


def synthetic_trace(world: int, label: str) -> Trace:
    spans = (
        Span("forward", "", 0.000, 0.010),
        Span("all_gather", "", 0.000, 0.001, "forward"),
        Span("forward", "blocks.0", 0.002, 0.005),
        Span("all_gather", "blocks.0", 0.002, 0.003, "forward"),
        Span("backward", "", 0.011, 0.020),
        Span("reduce_scatter", "", 0.018, 0.019, "backward"),
        Span("optimizer", "", 0.020, 0.022),
    )
    memory = ((0.0, 0), (0.001, 2 << 20), (0.012, 4 << 20), (0.02, 1 << 20))  # up to the top of the panel
    ranks = tuple(RankTrace(rank=r, spans=spans, steps=((0.0, 0.022),), memory=memory) for r in range(world))
    return Trace(label=label, fsdp_version=2, world_size=world, ranks=ranks, units=("", "blocks.0"))


def reports(model: str, world: int) -> list[MemoryReport]:
    params = fsdp1_layout(specs(model), world).bytes_per_rank
    twice = [RankBytes(real=2 * b.real, padding=2 * b.padding) for b in params]
    return [
        MemoryReport(rank=r, world_size=world, params=p, grads=p, optimizer=o)
        for r, (p, o) in enumerate(zip(params, twice))
    ]


def make(kind: str, model: str, world: int) -> Figure:
    s = specs(model)
    fig = {
        "fsdp1": lambda: plot_fsdp1(fsdp1_layout(s, world)),
        "fsdp2": lambda: plot_fsdp2(fsdp2_layout(s, world)),
        "comparison": lambda: plot_comparison(fsdp1_layout(s, world), fsdp2_layout(s, world)),
        "memory": lambda: plot_memory({"FSDP1": fsdp1_layout(s, world), "FSDP2": fsdp2_layout(s, world)}),
        "memory_reports": lambda: plot_memory(reports(model, world)),
        "timeline": lambda: plot_timeline([synthetic_trace(world, "FSDP1"), synthetic_trace(world, "FSDP2")]),
    }[kind]()
    fig.set_dpi(DPI)
    return fig


PNG_CASES = [
    pytest.param(kind, model, world, id=f"{kind}-{model}-{world}")
    for kind in ("fsdp1", "fsdp2", "comparison", "memory", "memory_reports")
    for model in MODELS
    for world in WORLDS
] + [pytest.param("timeline", "Layer", world, id=f"timeline-{world}") for world in WORLDS]


# ---- the checks --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, model, world", PNG_CASES)
def test_labels_are_readable_apart_and_whole_and_legends_off_the_data(kind, model, world):
    fig = make(kind, model, world)
    seen = drawn_texts(fig)
    assert len(seen) >= 5  # titles, tick labels, legend... there is something to check
    sizes = {d.text.get_text(): shown_px(fig, d.text) for d in seen}
    small = {t: round(px, 2) for t, px in sizes.items() if px < MIN_PX}
    assert not small, f"labels under {MIN_PX} px at 950 px: {small}"
    assert not overlapping(seen)
    assert not cut_off(seen)
    assert legend_hits(fig) == []
    if kind == "timeline":  # tutorial 04 zooms on the forward, where the memory curve fills the panel's width
        for ax in fig.axes:
            ax.set_xlim(0, 3)  # the legend is anchored to the axes, the curve follows the new limits: no redraw
        assert legend_hits(fig) == []


def svg_sizes_px(svg: str) -> list[float]:
    """Every text's font size as shown when the SVG is scaled to 950 px wide."""
    view_width = float(re.search(r'viewBox="0 0 ([\d.]+) [\d.]+"', svg).group(1))
    texts = re.findall(r"<text [^>]*>", svg)
    assert texts and not any("scale(" in t for t in texts)  # font sizes are in user units, not rescaled
    return [float(re.search(r"font-size: ([\d.]+)px", t).group(1)) * AREA_PX / view_width for t in texts]


EXPLORER_CASES = (
    [
        pytest.param(dict(world_size=world, version=version), id=f"v{version}-{world}")
        for version in ("1", "2", "both")
        for world in WORLDS
    ]
    + [
        pytest.param(dict(world_size=world, d_in=32, d_hidden=32, d_out=32), id=f"widest-{world}")
        for world in (1, 3, 8)
    ]
    + [pytest.param(dict(world_size=3, freeze_l1=True, l2_bf16=True, fsdp2_per_layer=False), id="rejected")]
    + [  # the mesh controls: HSDP, FSDP + TP (the (R, S, T) figure under FSDP1's sentence), both, FSDP1 alone
        pytest.param(dict(world_size=world, dp_replicate=R, tp=T, version=version), id=f"v{version}-{R}x{S}x{T}")
        for R, S, T in [(2, 4, 1), (4, 2, 1), (1, 1, 2), (1, 2, 2), (2, 2, 2), (1, 4, 2)]
        for world in [R * S * T]
        for version in ("1", "2", "both")
        if T > 1 or version == "both"
    ]
    + [pytest.param(dict(world_size=8, tp=2, d_in=32, d_hidden=32, d_out=32), id="widest-tp")]
)


@pytest.mark.parametrize("settings", EXPLORER_CASES)
def test_explorer_svg_labels_are_readable_apart_and_whole(settings):
    fig, _ = render(ExplorerSettings(**settings))
    svg = svg_markup(fig)
    sizes = svg_sizes_px(svg)
    assert min(sizes) >= MIN_PX, sorted(sizes)[:3]
    seen = drawn_texts(fig, "svg")
    lines = {html.unescape(t) for t in re.findall(r"<text [^>]*>([^<]*)</text>", svg)}
    for d in seen:  # the labels measured here are the ones in the SVG
        assert set(d.text.get_text().splitlines()) <= lines, d.text.get_text()
    assert not overlapping(seen)
    assert not cut_off(seen)


def test_explorer_static_picture_is_readable_and_says_to_run_the_cell():
    from PIL import Image

    explorer = Explorer(ExplorerSettings(world_size=8))
    bundle = explorer._repr_mimebundle_()
    png = Image.open(io.BytesIO(base64.b64decode(bundle["image/png"])))
    assert png.info["dpi"][0] == pytest.approx(100, abs=0.5) and png.width <= AREA_PX  # shown 1:1, not shrunk
    fig = explorer.first
    assert fig.get_size_inches()[0] * 100 == pytest.approx(png.width, abs=1)
    seen = drawn_texts(fig)
    (note,) = [d.text for d in seen if d.text.get_gid() == "note"]
    assert "run the cell for the controls" in note.get_text()  # in the pixels: JupyterLab and GitHub show those
    smallest = min(d.text.get_fontsize() * 100 / 72 * min(1.0, AREA_PX / png.width) for d in seen)
    assert smallest >= MIN_PX
    assert not overlapping(seen) and not cut_off(seen)


@pytest.mark.parametrize("settings", [dict(world_size=8, dp_replicate=2, tp=2), dict(world_size=4, dp_replicate=2)])
def test_explorer_static_picture_of_a_mesh_is_readable_and_says_to_run_the_cell(settings):
    fig = Explorer(ExplorerSettings(**settings)).first
    fig.set_dpi(DPI)
    assert fig.get_size_inches()[0] * DPI <= AREA_PX  # saved at 100 dpi: shown 1:1, not shrunk
    seen = drawn_texts(fig)
    (note,) = [d.text for d in seen if d.text.get_gid() == "note"]
    assert "run the cell for the controls" in note.get_text()
    assert min(shown_px(fig, d.text) for d in seen) >= MIN_PX
    assert not overlapping(seen) and not cut_off(seen)


def test_the_checks_catch_what_they_look_for():
    """A figure made to fail: 6 pt labels, two on top of each other, one over the edge, a legend over a curve."""
    fig = Figure(figsize=(9, 3), dpi=DPI)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], label="curve")
    ax.legend(loc="center")
    ax.text(0.5, 0.9, "small", fontsize=6)
    ax.text(0.5, 0.9, "on top", fontsize=10)
    ax.text(1.0, 0.5, "over the edge of the figure", fontsize=10, transform=fig.transFigure)
    FitText(ax, (0.0, 0.0, 0.01, 0.01), [("too wide for its box", 0)])
    seen = drawn_texts(fig)
    assert min(shown_px(fig, d.text) for d in seen) == pytest.approx(6 * 100 / 72)
    assert overlapping(seen) == [("small", "on top")]
    assert cut_off(seen) == ["over the edge of the figure"]
    assert "too wide for its box" not in [d.text.get_text() for d in seen]  # FitText left it out
    assert legend_hits(fig) == ["line curve"]
    wide = Figure(figsize=(19, 3), dpi=DPI)  # a PNG twice the output's width is shown at half size
    assert shown_px(wide, wide.text(0, 0, "x", fontsize=10)) == pytest.approx(10 * 100 / 72 / 2)
