"""A layout explorer that needs no processes: sliders in, FSDP1 / FSDP2 pictures out.

`render(settings)` is the whole redraw, a pure function (settings -> Figure and
text). `Explorer` only wires ipywidgets controls to it; tests drive
`Explorer.update()` after setting widget values and read `.figure` and `.text`.

The mesh controls (replicas, tp) put FSDP, HSDP and FSDP + TP side by side at one world
size; the text gives every layout's bytes per rank, the number that differs between them.
With tp > 1 the picture is the (R, S, T) mesh figure of `tp_figs` and FSDP1 gets a sentence
instead of a panel: it has no TP form [Note: TP layouts]. Settings that the mesh cannot take
(a tp or replica count that does not divide the world size, a tp that does not divide the
layer's hidden size) are refused by `ExplorerSettings` in one line, which the widget shows
in place of the picture.

The 1-D / HSDP figure is always `FIGURE_INCHES` wide, the width of a notebook's output
area (~950 px), whatever the number of panels: the SVG is scaled to that width, so 1 pt
of the figure is 950 / (9.5 * 72) = 1.39 px on screen, and every label (7 pt at
least) is 9.7 px or more. The TP figure is at most 9.4 in wide and scaled the same way:
its labels only grow.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
from dataclasses import dataclass, fields

import torch
from matplotlib import rc_context
from matplotlib.figure import Figure

from fsdp_nb.layout import ParamSpec, fsdp1_layout, fsdp2_layout
from fsdp_nb.layout.mesh_layout import shard_size
from fsdp_nb.models import Layer
from fsdp_nb.viz.explorer_views import FIGURE_INCHES, NO_TP_FSDP1, STATIC_DPI, draw_view, text_view

__all__ = [  # FIGURE_INCHES and NO_TP_FSDP1 live in explorer_views; benchmarks and tests read them here
    "FIGURE_INCHES",
    "NOTE",
    "NO_TP_FSDP1",
    "STATIC_DPI",
    "Explorer",
    "ExplorerSettings",
    "explore",
    "layer_specs",
    "picture",
    "render",
    "svg_markup",
]

VERSIONS = ("1", "2", "both")
MAX_DIM = 32
NOTE = "A picture of the explorer's first state: run the cell for the controls"


@dataclass(frozen=True, kw_only=True)
class ExplorerSettings:
    """One position of the explorer's controls (the three-Linear `Layer`)."""

    world_size: int = 2
    """Ranks to shard over, 1 to 8."""
    dp_replicate: int = 1
    """R: replicas of every shard (HSDP); R · tp must divide world_size."""
    tp: int = 1
    """T: tensor-parallel ranks, with `Layer.base_model_tp_plan` (l1 colwise, l2 rowwise); divides d_hidden."""
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
        for name in ("dp_replicate", "tp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 8:
                raise ValueError(f"ExplorerSettings: {name}={value!r} must be an int in 1..8")
        try:
            shard_size(self.world_size, self.dp_replicate, self.tp)
        except ValueError as e:  # already one line, with the values accepted
            raise ValueError(f"ExplorerSettings: {e}") from None
        if self.d_hidden % self.tp:
            fits = [t for t in range(1, 9) if self.world_size % (self.dp_replicate * t) == 0 and self.d_hidden % t == 0]
            raise ValueError(
                f"ExplorerSettings: tp={self.tp} cuts l1's rows (colwise) and l2's columns (rowwise), "
                f"{self.d_hidden} each (hidden): tp must divide {self.d_hidden}; accepted here: {fits}"
            )


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


def _layouts(s: ExplorerSettings):
    """(FSDP1 layout or None, FSDP2 layout or None) for the versions shown; FSDP1 has none under TP."""
    specs = layer_specs(s)
    lay1 = lay2 = None
    if s.version in ("1", "both") and s.tp == 1:
        lay1 = fsdp1_layout(specs, s.world_size, use_orig_params=s.use_orig_params, dp_replicate=s.dp_replicate)
    if s.version in ("2", "both"):
        groups = ("l1", "l2", "l3", "") if s.fsdp2_per_layer else ("",)
        plan = Layer.base_model_tp_plan if s.tp > 1 else None
        lay2 = fsdp2_layout(specs, s.world_size, groups=groups, dp_replicate=s.dp_replicate, tp=s.tp, tp_plan=plan)
    return lay1, lay2


def render(s: ExplorerSettings) -> tuple[Figure, str]:
    """Redraw for one setting: the figure and the text shown under it."""
    lay1, lay2 = _layouts(s)
    return draw_view(s, lay1, lay2), text_view(s, lay1, lay2)


def picture(s: ExplorerSettings) -> Figure:
    """The static stand-in for the widget (GitHub, nbviewer, no widget state): the figure, saying it is one."""
    return draw_view(s, *_layouts(s), note=NOTE)


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
            "dp_replicate": w.IntSlider(
                value=s.dp_replicate, min=1, max=8, description="replicas", continuous_update=False
            ),
            "tp": w.IntSlider(value=s.tp, min=1, max=8, description="tp", continuous_update=False),
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
        c = self.controls
        mesh = w.VBox([c["world_size"], c["dp_replicate"], c["tp"]])
        shapes = w.VBox([c["d_in"], c["d_hidden"], c["d_out"]])
        options = w.VBox([c[k] for k in ("use_orig_params", "freeze_l1", "l2_bf16", "fsdp2_per_layer")])
        self.widget = w.VBox([w.HBox([mesh, shapes]), w.HBox([c["version"], options]), self.view, self.message])
        self.update()

    def settings(self) -> ExplorerSettings:
        return ExplorerSettings(**{f.name: self.controls[f.name].value for f in fields(ExplorerSettings)})

    def update(self, change=None) -> None:
        """Recompute and redraw from the current control values; settings the mesh cannot take leave one line."""
        try:
            self.figure, self.text = render(self.settings())
        except ValueError as e:  # ExplorerSettings' one-line refusal, e.g. a tp that does not divide the world
            self.figure, self.text = None, str(e)
            self.view.value = ""
            self.message.value = f'<pre style="white-space:pre-wrap;color:#b00020">{html.escape(self.text)}</pre>'
            return
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
