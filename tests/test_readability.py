"""What a reader sees: figures that fit 950 px, widgets that leave a static trace, errors said once, short paths.

Each test pins down a problem found by trying the tutorials in JupyterLab as a new user would.
"""

from __future__ import annotations

import re

import pytest
import torch

from fsdp_nb.layout import fsdp1_layout, fsdp2_layout, specs_of
from fsdp_nb.models import Layer
from fsdp_nb.session import protocol as P
from fsdp_nb.session.dashboard import Dashboard
from fsdp_nb.session.results import CellResult, RankError, same_error_key

NOTEBOOK_WIDTH_IN = 9.5  # ~950 px at matplotlib's 100 dpi


def test_figures_fit_a_notebook_output_area():
    from fsdp_nb import viz

    specs = specs_of(Layer())
    for world in (2, 8):
        figures = [
            viz.plot_comparison(fsdp1_layout(specs, world), fsdp2_layout(specs, world)),
            viz.plot_fsdp1(fsdp1_layout(specs, world)),
            viz.plot_fsdp2(fsdp2_layout(specs, world)),
        ]
        for fig in figures:
            assert fig.get_size_inches()[0] <= NOTEBOOK_WIDTH_IN, fig.get_size_inches()


def test_a_one_row_shard_label_sits_on_white_over_the_padded_block():
    from matplotlib.figure import Figure

    from fsdp_nb.viz.layout_figs import draw_fsdp2

    ax = Figure().add_subplot()
    draw_fsdp2(ax, fsdp2_layout(specs_of(Layer()), 2))  # l3.weight has 3 rows: 2 on rank 0, 1 on rank 1
    label = next(t for t in ax.texts if t.get_gid() == "rank1/l3.weight")
    box = next(p for p in ax.patches if p.get_gid() == "rank1/l3.weight")
    pad = next(p for p in ax.patches if p.get_gid() == "rank1/padding:l3.weight")
    assert label.get_bbox_patch() is not None  # white ground: readable over the hatch
    assert label.get_position()[1] == pytest.approx(pad.get_y() + (pad.get_height() + box.get_height()) / 2)


def test_slivers_too_narrow_for_a_label_get_none():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fsdp_nb.viz.layout_figs import draw_fsdp1

    fig = Figure(figsize=(9.5, 4))
    ax = fig.add_subplot()
    layout = fsdp1_layout(specs_of(Layer(d_in=40, d_hidden=40, d_out=2)), 8)
    draw_fsdp1(ax, layout)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # labels choose their form when drawn, in the axes' final size
    renderer = canvas.get_renderer()
    labels = {t.get_gid(): t for t in ax.texts if t.get_gid() and t.get_gid().startswith("rank")}
    pieces = [p for p in ax.patches if (p.get_gid() or "").startswith("rank") and "padding" not in p.get_gid()]
    shown = [p for p in pieces if labels[p.get_gid()].get_text()]
    assert shown and len(shown) < len(pieces)  # this layout has both slivers and wide pieces

    def inside(label, patch):
        a, b = label.get_window_extent(renderer), patch.get_window_extent(renderer)
        return b.x0 <= a.x0 and a.x1 <= b.x1 and b.y0 <= a.y0 and a.y1 <= b.y1

    for patch in pieces:
        label = labels[patch.get_gid()]
        if patch in shown:  # a label is drawn only inside its piece: never over a neighbour or the row above
            assert inside(label, patch), (patch.get_gid(), label.get_text())
        else:  # and left out only when none of its forms fits
            for text, rotation in label.forms:
                label.set_text(text)
                label.set_rotation(rotation)
                assert not inside(label, patch), (patch.get_gid(), text, rotation)


def test_explorer_scales_to_its_container_and_leaves_a_picture():
    from fsdp_nb.viz.explorer import Explorer, ExplorerSettings, svg_markup

    explorer = Explorer(ExplorerSettings(version="both", freeze_l1=True))
    head = svg_markup(explorer.figure).split(">", 1)[0]
    assert 'style="width:100%;height:auto"' in head and " width=" not in head and "viewBox" in head
    bundle = explorer._repr_mimebundle_()
    data = bundle[0] if isinstance(bundle, tuple) else bundle
    assert "application/vnd.jupyter.widget-view+json" in data and data["image/png"]
    assert "run the cell for the controls" in data["text/plain"]
    assert all(not c.continuous_update for c in explorer.controls.values() if hasattr(c, "continuous_update"))
    assert max(len(line) for line in explorer.text.splitlines()) <= 110
    assert not re.search(r"\w-\n", explorer.text)  # folded at spaces, never inside a word


def test_dashboard_leaves_a_static_picture_and_line_with_integer_steps():
    dash = Dashboard(widgets=True)
    dash.new_cell(live=False)  # collated: no widget at all
    for step in (1, 2, 3):
        dash(0, "progress", {"step": step, "total": 3, "desc": "train"})
        dash(0, "metrics", {"step": step, "loss": 1.0 / step, "run": "FSDP1"})
        dash(0, "metrics", {"step": step, "loss": 1.0 / step, "run": "FSDP2"})
    bundle = dash.static_bundle()
    assert re.fullmatch(r"train: 3/3 steps · final loss 0\.3333 · in \d+\.\d\d s", bundle["text/plain"])
    assert bundle["image/png"]
    ax = dash.figure().axes[0]
    assert ax.get_xlim() == (0.5, 3.5)  # fixed by the progress total: no rescaling as steps arrive
    assert all(float(t).is_integer() for t in ax.get_xticks())
    fsdp1, fsdp2 = [line for line in ax.lines if line.get_label().endswith("rank 0")]
    assert fsdp1.get_linestyle() != fsdp2.get_linestyle()  # identical curves stay visible
    assert dash.view is None  # collated cells never build widgets


def test_the_live_bar_and_plot_show_the_same_step_at_every_update(monkeypatch):
    """Ranks report one by one, and progress comes before a step's metrics: the one widget shows the
    step every curve has reached, in the bar, its line and the plot's title alike."""
    from fsdp_nb.session import dashboard as module

    monkeypatch.setattr(module, "REDRAW_S", 0.0)  # every event redraws
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: None)
    dash = Dashboard(widgets=True)
    dash.new_cell(live=True)
    seen = []
    for step in range(1, 11):
        for rank, kind in ((0, "progress"), (0, "metrics"), (1, "metrics")):
            payload = (
                {"step": step, "total": 10, "desc": "train"} if kind == "progress" else {"step": step, "loss": 1.0}
            )
            dash(rank, kind, payload)
            view = dash.view.value
            bar = int(re.search(r'<progress[^>]* value="(\d+)"', view).group(1))
            line = int(re.search(r"train (\d+)/10</span>", view).group(1))
            plot = re.search(r'alt="loss, step (\d+)/10"', view)
            if plot is None:  # the very first event: a bar, and no metric yet to plot
                assert (step, kind, "<img" in view) == (1, "progress", False)
                continue
            title = int(plot.group(1))
            seen.append((bar, line, title))
            assert bar == line == title, (rank, kind, step, view[:200])
            assert bar <= step and bar >= step - 1  # never ahead of the slowest curve, never far behind
    assert seen[-1] == (10, 10, 10) and len({b for b, _, _ in seen}) == 10
    dash.finish()
    assert dash.view is None


def test_dashboard_single_point_is_drawn_as_a_marker():
    dash = Dashboard(widgets=False)
    dash(0, "metrics", {"step": 1, "loss": 2.0})
    line = dash.figure().axes[0].lines[0]
    assert line.get_marker() == "o"


def _error(text: str, etype: str = "RuntimeError") -> P.RemoteError:
    return P.RemoteError(etype, text.splitlines()[0], text)


def test_errors_differing_only_by_set_order_or_rank_numbers_merge():
    a = "AssertionError: FSDP expects uniform dtype but got {torch.float32, torch.bfloat16}\n"
    b = "AssertionError: FSDP expects uniform dtype but got {torch.bfloat16, torch.float32}\n"
    assert same_error_key(a) == same_error_key(b)
    assert same_error_key("rank 0 has 12 rows") == same_error_key("rank 1 has 11 rows")
    assert same_error_key("ValueError: x") != same_error_key("TypeError: x")
    result = CellResult(ranks=[0, 1], world_size=2)
    for r, text in enumerate((a, b)):
        result.dones[r] = P.Done(1, r, error=_error(text, "AssertionError"))
        result.order.append(r)
    assert [ranks for ranks, _ in RankError(result).groups()] == [[0, 1]]


def _raise_in(code: str):
    from fsdp_nb.rank.cells import run_source

    try:
        run_source(code, "<cell 1>", {})  # as a rank runs a cell: its lines can be quoted
    except BaseException as e:  # noqa: BLE001
        return e
    raise AssertionError("no exception")


def test_rank_tracebacks_are_short_and_say_things_once():
    from fsdp_nb.rank.errors import format_error

    # torch's refusal raised in a cell gets one explanation, in its short form; an error fsdp_nb words
    # itself gets none, and is short too; the whole traceback (what %fsdp_tb shows) explains nothing.
    e = _raise_in(
        "raise ValueError('Must flatten tensors with uniform dtype but got torch.float32 and torch.bfloat16')"
    )
    error = format_error(e)
    assert [line.split(":")[0] for line in error.short] == ["<cell 1>, line 1", "fsdp_nb explains"]
    assert "fsdp_nb explains" not in error.traceback and 'File "<cell 1>"' in error.traceback
    e = _raise_in("from fsdp_nb import FSDPConfig\nFSDPConfig(fsdp_version=1, sharding_strategy='FSDP2_PLEASE')")
    error = format_error(e)
    assert error.short == ("<cell 1>, line 2: FSDPConfig(fsdp_version=1, sharding_strategy='FSDP2_PLEASE')",)
    assert "fsdp_nb explains" not in error.traceback
    # Paths of this machine are cut to their meaningful tail.
    e = _raise_in("import torch\ntorch.nn.Linear(2, 2)(torch.zeros(3))")  # raised below a frame of torch's
    text = format_error(e).traceback
    assert 'File "<cell 1>"' in text and 'File "site-packages/torch/nn/modules/linear.py"' in text, text
    assert not re.search(r'File "/', text), text  # no absolute path


def test_an_interrupt_shows_no_frame_of_fsdp_nb_machinery():
    from fsdp_nb.rank import worker
    from fsdp_nb.rank.errors import format_error

    state = worker._Rank(0, 1, conn=None)
    state.executing = True
    e = _raise_in_with(lambda: state.on_sigint(2, None))
    assert "fsdp_nb/rank/worker.py" not in format_error(e).traceback  # the handler that raised is not shown


def _raise_in_with(fn):
    ns = {"fn": fn}
    try:
        exec(compile("fn()", "<cell 1>", "exec"), ns)
    except BaseException as e:  # noqa: BLE001
        return e
    raise AssertionError("no exception")


def test_stderr_from_ranks_has_short_paths():
    from fsdp_nb.rank.errors import shorten_paths

    torch_file = torch.__file__
    assert shorten_paths(f"warning in {torch_file}:3").startswith("warning in site-packages/torch/__init__.py")
    inside = "/data" + torch_file  # not this machine's install: a longer path that merely contains it
    assert shorten_paths(inside) == inside


def test_the_summary_speaks_of_this_cells_run(capsys):
    dash = Dashboard(widgets=False)
    for step in range(1, 21):
        dash(0, "metrics", {"step": step, "loss": 1.0, "run": "demo"})
    dash(0, "metrics", {"step": 1, "loss": 1.0, "run": "other"})
    dash.new_cell(live=False)
    for step in range(1, 6):  # "demo" again, shorter: a re-run cell
        dash(0, "metrics", {"step": step, "loss": 1.0, "run": "demo"})
    assert dash.summary().startswith("demo: 5 steps · final loss 1.0000")
    dash(0, "progress", {"step": 1, "total": 2, "desc": "train"})
    dash(0, "checkpoint", {"path": "/x/step-000001", "status": "saved", "seconds": 0.5})
    err = capsys.readouterr().err
    assert err.endswith("\ncheckpoint step-000001: saved in 0.50 s\n")  # not glued to the progress bar's line
