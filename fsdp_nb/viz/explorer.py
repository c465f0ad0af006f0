"""A layout explorer that needs no processes: sliders in, FSDP1 / FSDP2 pictures out.

`render(settings)` is the whole redraw, a pure function (settings -> Figure and
text). `Explorer` only wires ipywidgets controls to it; tests drive
`Explorer.update()` after setting widget values and read `.figure` and `.text`.

The figure is always `FIGURE_INCHES` wide, the width of a notebook's output area
(~950 px), whatever the number of panels: the SVG is scaled to that width, so 1 pt
of the figure is 950 / (9.5 * 72) = 1.39 px on screen, and every label (7 pt at
least) is 9.7 px or more.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
import textwrap
from dataclasses import dataclass, fields

import torch
from matplotlib import rc_context
from matplotlib.figure import Figure

from fsdp_nb.layout import ParamSpec, fsdp1_layout, fsdp2_layout
from fsdp_nb.viz.labels import AREA_INCHES
from fsdp_nb.viz.layout_figs import draw_fsdp1, draw_fsdp2
from fsdp_nb.viz.tables import format_fsdp1

VERSIONS = ("1", "2", "both")
MAX_DIM = 32
FIGURE_INCHES = (AREA_INCHES, 3.6)
"""Width and height of the redrawn figure, one panel or two."""
MARGINS = (0.95, 0.1, 0.1, 0.55)
"""Inches around each panel's axes (left, right, bottom, top): row labels on the left, titles on top."""
STATIC_DPI = 100
"""The static picture (PNG) is as wide as the output area: 950 px, labels 9.7 px and more."""
NOTE = "A picture of the explorer's first state: run the cell for the controls"


@dataclass(frozen=True, kw_only=True)
class ExplorerSettings:
    """One position of the explorer's controls (the three-Linear `Layer`)."""

    world_size: int = 2
    """Ranks to shard over, 1 to 8."""
    d_in: int = 4
    """`l1` input features."""
    d_hidden: int = 6
    """`l1` output, `l2` input and output features."""
    d_out: int = 3
    """`l3` output features."""
    version: str = "both"
    """"1" (FSDP1 FlatParameter), "2" (FSDP2 DTensor) or "both" side by side."""
    use_orig_params: bool = False
    """FSDP1's `use_orig_params`."""
    freeze_l1: bool = False
    """`l1.requires_grad_(False)`."""
    l2_bf16: bool = False
    """`l2` stored in bfloat16, the rest in float32."""
    fsdp2_per_layer: bool = True
    """FSDP2: `fully_shard` each Linear, then the root (False: one call on the root)."""

    def __post_init__(self):
        if not isinstance(self.world_size, int) or not 1 <= self.world_size <= 8:
            raise ValueError(f"ExplorerSettings: world_size={self.world_size!r} must be an int in 1..8")
        for name in ("d_in", "d_hidden", "d_out"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= MAX_DIM:
                raise ValueError(f"ExplorerSettings: {name}={value!r} must be an int in 1..{MAX_DIM}")
        if self.version not in VERSIONS:
            raise ValueError(f"ExplorerSettings: version={self.version!r} must be one of {VERSIONS}")


def layer_specs(s: ExplorerSettings) -> tuple[ParamSpec, ...]:
    """The `Layer`'s parameters for these settings, without building the module."""
    dims = {"l1": (s.d_hidden, s.d_in), "l2": (s.d_hidden, s.d_hidden), "l3": (s.d_out, s.d_hidden)}
    specs = []
    for layer, (out_f, in_f) in dims.items():
        dtype = torch.bfloat16 if layer == "l2" and s.l2_bf16 else torch.float32
        grad = not (layer == "l1" and s.freeze_l1)
        specs.append(ParamSpec(name=f"{layer}.weight", shape=(out_f, in_f), dtype=dtype, requires_grad=grad))
        specs.append(ParamSpec(name=f"{layer}.bias", shape=(out_f,), dtype=dtype, requires_grad=grad))
    return tuple(specs)


def _verdict(layout, version: int, s: ExplorerSettings) -> str:
    """Plain-text verdict: what torch raises and why, or why it works."""
    if layout.raises:
        first = layout.errors[0]
        return _wrapped(f"FSDP{version}: torch raises {first.when}:\n  {first.raises}\n  why: {first.message}")
    lines = [f"FSDP{version}: works."]
    if version == 2:
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


def _wrapped(text: str, width: int = 110) -> str:
    """Long lines folded at word boundaries, continuation lines indented under their line's text."""
    out = []
    for line in text.splitlines():
        indent = " " * (len(line) - len(line.lstrip()) + 2)
        out.append(textwrap.fill(line, width, subsequent_indent=indent, break_long_words=False) if line else "")
    return "\n".join(out)


def _panels(s: ExplorerSettings):
    """(draw function, layout) per panel, and the verdict text."""
    specs = layer_specs(s)
    panels, texts = [], []
    if s.version in ("1", "both"):
        lay1 = fsdp1_layout(specs, s.world_size, use_orig_params=s.use_orig_params)
        panels.append((draw_fsdp1, lay1))
        texts += [_verdict(lay1, 1, s), format_fsdp1(lay1).split("\n", 1)[0]]
    if s.version in ("2", "both"):
        groups = ("l1", "l2", "l3", "") if s.fsdp2_per_layer else ("",)
        lay2 = fsdp2_layout(specs, s.world_size, groups=groups)
        panels.append((draw_fsdp2, lay2))
        texts += [_verdict(lay2, 2, s)]
    return panels, "\n\n".join(texts)


def _figure(panels, note: str = "") -> Figure:
    """Panels side by side in the output area's width; `note` is a line over them."""
    width, height = FIGURE_INCHES
    left, right, bottom, top = MARGINS
    top += 0.3 if note else 0.0
    height += 0.3 if note else 0.0
    # Fixed axes positions: constrained layout would cost a second full draw per change.
    fig = Figure(figsize=(width, height), dpi=STATIC_DPI)
    each = width / len(panels)
    for k, (draw, layout) in enumerate(panels):
        rect = ((k * each + left) / width, bottom / height, (each - left - right) / width, 1 - (top + bottom) / height)
        draw(fig.add_axes(rect), layout, compact=True)
    if note:
        fig.text(0.5, 1 - 0.08 / height, note, ha="center", va="top", fontsize=9, color="#444444", gid="note")
    return fig


def render(s: ExplorerSettings) -> tuple[Figure, str]:
    """Redraw for one setting: the figure and the text shown under it."""
    panels, text = _panels(s)
    return _figure(panels), text


def picture(s: ExplorerSettings) -> Figure:
    """The static stand-in for the widget (GitHub, nbviewer, no widget state): the figure, saying it is one."""
    return _figure(_panels(s)[0], note=NOTE)


def svg_markup(fig: Figure) -> str:
    """Inline SVG with text left as text: the browser draws the glyphs, which halves the redraw time."""
    buf = io.StringIO()
    with rc_context({"svg.fonttype": "none"}):
        fig.savefig(buf, format="svg")
    text = buf.getvalue()
    svg = text[text.index("<svg") :]  # drop the XML prolog to embed it in HTML
    # Scale to the output area (the viewBox keeps the proportions): side by side is wider than a
    # notebook's ~950 px, and a fixed width would be cut off without a scrollbar.
    head, rest = svg.split(">", 1)
    head = re.sub(r'\s(width|height)="[^"]*"', "", head) + ' style="width:100%;height:auto"'
    return head + ">" + rest


class Explorer:
    """The widgets and their wiring. `widget` is what a notebook displays."""

    def __init__(self, settings: ExplorerSettings | None = None):
        import ipywidgets as w

        s = settings or ExplorerSettings()
        self.controls = {
            # continuous_update=False: a drag redraws once, on release, instead of queueing a redraw per pixel
            "world_size": w.IntSlider(
                value=s.world_size, min=1, max=8, description="world size", continuous_update=False
            ),
            "d_in": w.IntSlider(value=s.d_in, min=1, max=MAX_DIM, description="l1 in", continuous_update=False),
            "d_hidden": w.IntSlider(
                value=s.d_hidden, min=1, max=MAX_DIM, description="hidden", continuous_update=False
            ),
            "d_out": w.IntSlider(value=s.d_out, min=1, max=MAX_DIM, description="l3 out", continuous_update=False),
            "version": w.ToggleButtons(
                options=[("FSDP1", "1"), ("FSDP2", "2"), ("side by side", "both")],
                value=s.version,
                description="version",
            ),
            "use_orig_params": w.Checkbox(value=s.use_orig_params, description="use_orig_params (FSDP1)"),
            "freeze_l1": w.Checkbox(value=s.freeze_l1, description="freeze l1"),
            "l2_bf16": w.Checkbox(value=s.l2_bf16, description="l2 in bf16"),
            "fsdp2_per_layer": w.Checkbox(value=s.fsdp2_per_layer, description="fully_shard per layer (FSDP2)"),
        }
        self.view = w.HTML()
        self.message = w.HTML()
        self.figure: Figure | None = None
        self.text = ""
        for control in self.controls.values():
            control.observe(self.update, names="value")
        self.first = picture(s)
        boxes = list(self.controls.values())
        self.widget = w.VBox([w.HBox([w.VBox(boxes[:5]), w.VBox(boxes[5:])]), self.view, self.message])
        self.update()

    def settings(self) -> ExplorerSettings:
        return ExplorerSettings(**{f.name: self.controls[f.name].value for f in fields(ExplorerSettings)})

    def update(self, change=None) -> None:
        """Recompute and redraw from the current control values."""
        self.figure, self.text = render(self.settings())
        self.view.value = svg_markup(self.figure)
        self.message.value = f'<pre style="white-space:pre-wrap">{html.escape(self.text)}</pre>'

    def _repr_mimebundle_(self, **kwargs):
        """The live widget, plus a picture of its first state for readers with no kernel (GitHub, nbviewer).

        The picture says in its own pixels that it is one: a frontend shows either the widget
        or the PNG (JupyterLab and GitHub never show text/plain beside a PNG), so the PNG is
        the only place where a reader without the widget is sure to see the hint.
        """
        if _static_only():  # no widget: the saved notebook has no widget state to lose
            bundle = data = {}
        else:
            bundle = self.widget._repr_mimebundle_(**kwargs)
            data = bundle[0] if isinstance(bundle, tuple) else bundle
        buf = io.BytesIO()
        self.first.savefig(buf, format="png", dpi=STATIC_DPI)
        data["image/png"] = base64.b64encode(buf.getvalue()).decode("ascii")
        data["text/plain"] = f"FSDP layout explorer. {NOTE}"
        return bundle


def _static_only() -> bool:
    """True in the deterministic mode that nbval and the saved tutorials run in (FSDP_NB_COLLATE=1): the
    explorer is shown as its picture alone, so a saved notebook carries no widget model, and a reader who
    opens it anywhere sees the picture and its hint, never "model not found"."""
    return os.environ.get("FSDP_NB_COLLATE", "").strip().lower() in ("1", "true", "yes", "on")


def explore(**settings) -> Explorer:
    """The explorer, ready to display: `explore()` or `explore(world_size=4, l2_bf16=True)`."""
    return Explorer(ExplorerSettings(**settings))
