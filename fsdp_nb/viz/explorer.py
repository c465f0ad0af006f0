"""A layout explorer that needs no processes: sliders in, FSDP1 / FSDP2 pictures out.

`render(settings)` is the whole redraw, a pure function (settings -> Figure and
text). `Explorer` only wires ipywidgets controls to it; tests drive
`Explorer.update()` after setting widget values and read `.figure` and `.text`.
"""

from __future__ import annotations

import base64
import html
import io
import re
import textwrap
from dataclasses import dataclass, fields

import torch
from matplotlib import rc_context
from matplotlib.figure import Figure

from fsdp_nb.layout import ParamSpec, fsdp1_layout, fsdp2_layout
from fsdp_nb.viz.layout_figs import draw_fsdp1, draw_fsdp2
from fsdp_nb.viz.tables import format_fsdp1

VERSIONS = ("1", "2", "both")
MAX_DIM = 32


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


def render(s: ExplorerSettings) -> tuple[Figure, str]:
    """Redraw for one setting: the figure and the text shown under it."""
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
    # Fixed axes positions: constrained layout would cost a second full draw per change.
    fig = Figure(figsize=(6.5 * len(panels), 3.6), dpi=72)
    width = 1.0 / len(panels)
    for k, (draw, layout) in enumerate(panels):
        ax = fig.add_axes((k * width + 0.14 * width, 0.04, 0.84 * width, 0.84))
        draw(ax, layout, compact=True)
    return fig, "\n\n".join(texts)


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
        self.first = render(s)[0]
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
        """The live widget, plus a picture of its first state for readers with no kernel (GitHub, nbviewer)."""
        bundle = self.widget._repr_mimebundle_(**kwargs)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        buf = io.BytesIO()
        self.first.savefig(buf, format="png", dpi=72)
        data["image/png"] = base64.b64encode(buf.getvalue()).decode("ascii")
        data["text/plain"] = "FSDP layout explorer (a picture of its first state): run the cell for the controls"
        return bundle


def explore(**settings) -> Explorer:
    """The explorer, ready to display: `explore()` or `explore(world_size=4, l2_bf16=True)`."""
    return Explorer(ExplorerSettings(**settings))
