"""The (R, S) mesh figure: readable in a 950 px output area, replicas coloured as their shard peer, and chosen
by `%fsdp_layout` for an HSDP layout; with tensor parallelism, the (R, S, T) figure: readable too, colours that
say which ranks hold the same data, maps that show the stride. Read back from what was drawn (texts, patches, gids)."""

from __future__ import annotations

import dataclasses
import functools
import re

import pytest
import torch
from matplotlib.colors import to_rgba
from test_figure_sizes import AREA_PX, DPI, MIN_PX, cut_off, drawn_texts, overlapping, shown_px

from fsdp_nb.layout import fsdp1_layout, fsdp2_layout, specs_of
from fsdp_nb.models import GPT, GPTConfig, Layer
from fsdp_nb.viz import plot_layout, plot_mesh_layout
from fsdp_nb.viz.labels import FitText

MODELS = {"Layer": lambda: specs_of(Layer()), "GPT": lambda: specs_of(GPT(GPTConfig.debug()))}
CELL = re.compile(r".+/rank\d+")
MESHES = [(R, S) for R in range(2, 9) for S in range(1, 9) if R * S <= 8]  # HSDP: R > 1


@functools.cache
def specs(model: str):
    return MODELS[model]()


def layout(version: int, model: str, R: int, S: int):
    make = fsdp1_layout if version == 1 else fsdp2_layout
    return make(specs(model), R * S, dp_replicate=R)


def cells(fig) -> dict[str, tuple]:
    """gid "<panel>/rank<r>" -> facecolour of every cell drawn (not the TP maps' "<panel>/rank<r>/map" and "/held")."""
    return {p.get_gid(): p.get_facecolor() for ax in fig.axes for p in ax.patches if CELL.fullmatch(p.get_gid() or "")}


# GPT at FSDP2 has 28 panels; the Layer at every mesh and version covers the shapes, GPT the big cases.
CASES = [
    pytest.param(version, "Layer", R, S, id=f"fsdp{version}-Layer-{R}x{S}") for version in (1, 2) for R, S in MESHES
] + [
    pytest.param(version, "GPT", R, S, id=f"fsdp{version}-GPT-{R}x{S}")
    for version in (1, 2)
    for R, S in [(2, 4), (4, 2)]
]


@pytest.mark.parametrize("version, model, R, S", CASES)
def test_mesh_labels_are_readable_apart_and_whole(version, model, R, S):
    lay = layout(version, model, R, S)
    fig = plot_mesh_layout(lay)
    fig.set_dpi(DPI)
    assert fig.get_size_inches()[0] * DPI <= AREA_PX  # shown at its own size: no shrinking
    seen = drawn_texts(fig)
    small = {d.text.get_text(): round(shown_px(fig, d.text), 2) for d in seen if shown_px(fig, d.text) < MIN_PX}
    assert not small, f"labels under {MIN_PX} px at 950 px: {small}"
    assert not overlapping(seen)
    assert not cut_off(seen)
    # every cell shows its rank and what it holds (the first, full form), nothing left out
    labels = {d.text.get_gid(): d.text.get_text() for d in seen if isinstance(d.text, FitText)}
    names = ["flat"] if version == 1 else [s.name for s in lay.params]
    assert len(labels) == len(names) * R * S
    for name in names:
        for rank in range(R * S):
            text = labels[f"{name}/rank{rank}"]
            assert text.startswith(f"rank {rank}\n"), text
            if version == 2:
                start, stop = lay.rows(name, rank)
                assert text.endswith(f"rows {start}:{stop}" if stop > start else "empty"), text
            else:
                s, chunk = rank % S, lay.chunk_numel
                assert text.endswith(f"[{s * chunk}:{(s + 1) * chunk}]"), text
    title = [d.text.get_text() for d in seen if d.text.get_gid() == "title"][0]
    assert f"{R} × {S} mesh" in title and "(Replicate(), Shard(dim=0))" in title


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("R, S", [(R, S) for R, S in MESHES if S > 1] + [(1, 8), (1, 3)])
def test_replicas_share_their_shard_colour_and_shards_differ(version, R, S):
    lay = layout(version, "Layer", R, S)
    colors = cells(plot_mesh_layout(lay))
    names = ["flat"] if version == 1 else [s.name for s in lay.params]
    assert len(colors) == len(names) * R * S
    for name in names:
        by_shard = [{to_rgba(colors[f"{name}/rank{r * S + s}"]) for r in range(R)} for s in range(S)]
        assert all(len(c) == 1 for c in by_shard), by_shard  # replica peers: exactly the same colour
        assert len({c for (c,) in by_shard}) == S  # shard indices: all different


def test_a_one_d_mesh_is_a_one_row_grid():
    fig = plot_mesh_layout(fsdp2_layout(specs("Layer"), 3))
    assert set(cells(fig)) == {f"{s.name}/rank{r}" for s in specs("Layer") for r in range(3)}
    title = [d.text.get_text() for d in drawn_texts(fig) if d.text.get_gid() == "title"][0]
    assert "1 × 3 mesh" in title and "(Shard(dim=0))" in title and "Replicate" not in title


def test_fsdp_layout_draws_the_mesh_of_the_version_read_from_the_ranks_when_it_is_hsdp():
    s = specs("Layer")
    fsdp1, fsdp2 = fsdp1_layout(s, 4, dp_replicate=2), fsdp2_layout(s, 4, dp_replicate=2)
    read2 = dataclasses.replace(fsdp2, observed_ranks=(0, 1, 2, 3))
    fig = plot_layout(fsdp1, read2, "model")
    assert set(cells(fig)) == {f"{p.name}/rank{r}" for p in s for r in range(4)}  # FSDP2's grids, not FSDP1's
    assert "model: read from the ranks" in fig.axes[0].texts[0].get_text()
    read1 = dataclasses.replace(fsdp1, observed_ranks=(0, 1, 2, 3))
    assert set(cells(plot_layout(read1, fsdp2, "model"))) == {f"flat/rank{r}" for r in range(4)}
    # a 1-D mesh keeps the side-by-side comparison
    flat = plot_layout(fsdp1_layout(s, 4), dataclasses.replace(fsdp2_layout(s, 4), observed_ranks=(0, 1, 2, 3)), "m")
    assert (
        len(flat.axes) == 2
        and flat._suptitle.get_text() == "m on 4 ranks: FSDP1 (modelled) | FSDP2 (read from the ranks)"
    )


# ---- tensor parallel: the (R, S, T) mesh ---------------------------------------------------------------------------
PLANS = {"Layer": Layer.base_model_tp_plan, "GPT": GPT.base_model_tp_plan}
TP_MESHES = [(1, 2, 2), (2, 2, 2), (1, 4, 2), (1, 1, 2)]  # (R, S, T)


def tp_layout(model: str, R: int, S: int, T: int):
    return fsdp2_layout(specs(model), R * S * T, dp_replicate=R, tp=T, tp_plan=PLANS[model])


def patches(fig) -> dict:
    return {p.get_gid(): p for ax in fig.axes for p in ax.patches if p.get_gid()}


@pytest.mark.parametrize("model", ["Layer", "GPT"])
@pytest.mark.parametrize("R, S, T", TP_MESHES, ids=lambda v: str(v))
def test_tp_mesh_labels_are_readable_apart_and_whole_and_name_rows_columns_placements(model, R, S, T):
    lay = tp_layout(model, R, S, T)
    fig = plot_mesh_layout(lay)
    fig.set_dpi(DPI)
    assert fig.get_size_inches()[0] * DPI <= AREA_PX
    seen = drawn_texts(fig)
    small = {d.text.get_text(): round(shown_px(fig, d.text), 2) for d in seen if shown_px(fig, d.text) < MIN_PX}
    assert not small, f"labels under {MIN_PX} px at 950 px: {small}"
    assert not overlapping(seen)
    assert not cut_off(seen)
    labels = {d.text.get_gid(): d.text.get_text() for d in seen if isinstance(d.text, FitText)}
    assert len(labels) == len(lay.params) * lay.world_size  # every cell labelled, in its full form
    for p in lay.params:
        for rank in range(lay.world_size):
            start, stop = lay.rows(p.name, rank)
            cols = lay.cols(p.name, rank)
            want = f"rank {rank}\n" + (f"rows {start}:{stop}" if stop > start else "empty")
            want += f"\ncols {cols[0]}:{cols[1]}" if cols and stop > start else ""
            assert labels[f"{p.name}/rank{rank}"] == want
    texts = [d.text.get_text() for d in seen]
    for i, p in enumerate(lay.params):  # each panel's title: name, role, torch's placements
        (panel,) = [t for t in texts if t.startswith(f"{p.name} {tuple(p.shape)}")]
        assert f"({', '.join(lay.placements(p.name))})" in panel
        assert ("off the plan" in panel) == (lay.tp_placements[i] is None)
    title = [d.text.get_text() for d in seen if d.text.get_gid() == "title"][0]
    assert (f"{R} × {S} × {T} mesh" if R > 1 else f"{S} × {T} mesh") in title
    assert f"{sum(t is None for t in lay.tp_placements)} of {len(lay.params)} parameters are off the TP plan" in title


@pytest.mark.parametrize("R, S, T", TP_MESHES + [(1, 2, 4), (2, 1, 4)], ids=lambda v: str(v))
def test_tp_colours_say_which_ranks_hold_the_same_data(R, S, T):
    """Same colour exactly when two ranks (with data) hold the same elements: replicas, and TP peers where TP
    does not cut (off the plan, a rowwise bias); TP peers of a cut parameter, and shard indices, differ."""
    model = "Layer" if T == 2 else "GPT"  # Layer's hidden size 6 does not split 4 ways
    lay = tp_layout(model, R, S, T)
    colors = cells(plot_mesh_layout(lay))
    assert len(colors) == len(lay.params) * lay.world_size
    kinds = set()
    for p in lay.params:
        full = [r for r in range(lay.world_size) if lay.rows(p.name, r)[1] > lay.rows(p.name, r)[0]]
        for a in full:
            for b in full:
                same_data = torch.equal(lay.elements(p.name, a), lay.elements(p.name, b))
                same_colour = to_rgba(colors[f"{p.name}/rank{a}"]) == to_rgba(colors[f"{p.name}/rank{b}"])
                assert same_data == same_colour, (p.name, a, b)
                kinds.add((same_data, a // T == b // T))  # (same data, TP peers)
    assert (True, True) in kinds and (False, True) in kinds  # TP peers of both kinds were compared


def test_tp_maps_show_the_stride_the_rows_and_the_columns():
    """Each cell's map places the held block where the rank's rows (and columns) lie in the whole parameter:
    for a colwise weight, shard 0 holds the top of every TP chunk, which is the stride."""
    lay = tp_layout("Layer", 1, 2, 2)
    drawn = patches(plot_mesh_layout(lay))
    for p in lay.params:
        rows = p.shape[0]
        ncols = p.shape[1] if len(p.shape) > 1 else 1
        for rank in range(lay.world_size):
            box = drawn[f"{p.name}/rank{rank}/map"]
            held = drawn[f"{p.name}/rank{rank}/held"]
            start, stop = lay.rows(p.name, rank)
            c0, c1 = lay.cols(p.name, rank) or (0, ncols)
            top = box.get_y() + box.get_height()
            assert (top - (held.get_y() + held.get_height())) / box.get_height() == pytest.approx(start / rows)
            assert held.get_height() / box.get_height() == pytest.approx((stop - start) / rows)
            assert (held.get_x() - box.get_x()) / box.get_width() == pytest.approx(c0 / ncols)
            assert held.get_width() / box.get_width() == pytest.approx((c1 - c0) / ncols)
    # the worked example: ranks 0 and 1 (shard 0) start their TP chunks; ranks 2 and 3 (shard 1) follow on
    first = [lay.rows("l1.weight", r)[0] for r in range(4)]
    assert first[0] == 0 and first[1] == 6 // 2 and first[2] > first[0] and first[3] > first[1]


def test_an_empty_tp_shard_is_hatched_and_holds_no_block():
    lay = tp_layout("Layer", 1, 4, 2)  # l1's 3 TP rows over 4 shards: shard 3 holds none
    drawn = patches(plot_mesh_layout(lay))
    empty = [r for r in range(8) if lay.rows("l1.weight", r)[0] == lay.rows("l1.weight", r)[1]]
    assert empty and all(drawn[f"l1.weight/rank{r}"].get_hatch() for r in empty)
    assert not any(f"l1.weight/rank{r}/held" in drawn for r in empty)
    assert all(f"l1.weight/rank{r}/held" in drawn for r in set(range(8)) - set(empty))


def test_fsdp_layout_draws_a_tp_layout_read_from_the_ranks_on_its_mesh():
    s = specs("Layer")
    tp = fsdp2_layout(s, 4, tp=2, tp_plan=Layer.base_model_tp_plan)
    fig = plot_layout(fsdp1_layout(s, 4), dataclasses.replace(tp, observed_ranks=(0, 1, 2, 3)), "model")
    assert set(cells(fig)) == {f"{p.name}/rank{r}" for p in s for r in range(4)}
    assert "model: read from the ranks" in [t.get_text() for t in fig.axes[0].texts if t.get_gid() == "title"][0]
