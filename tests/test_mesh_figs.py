"""The (R, S) mesh figure: readable in a 950 px output area, replicas coloured as their shard peer, and chosen
by `%fsdp_layout` for an HSDP layout. Read back from what was drawn (texts, patches, gids)."""

from __future__ import annotations

import dataclasses
import functools

import pytest
from matplotlib.colors import to_rgba
from test_figure_sizes import AREA_PX, DPI, MIN_PX, cut_off, drawn_texts, overlapping, shown_px

from fsdp_nb.layout import fsdp1_layout, fsdp2_layout, specs_of
from fsdp_nb.models import GPT, GPTConfig, Layer
from fsdp_nb.viz import plot_layout, plot_mesh_layout
from fsdp_nb.viz.labels import FitText

MODELS = {"Layer": lambda: specs_of(Layer()), "GPT": lambda: specs_of(GPT(GPTConfig.debug()))}
MESHES = [(R, S) for R in range(2, 9) for S in range(1, 9) if R * S <= 8]  # HSDP: R > 1


@functools.cache
def specs(model: str):
    return MODELS[model]()


def layout(version: int, model: str, R: int, S: int):
    make = fsdp1_layout if version == 1 else fsdp2_layout
    return make(specs(model), R * S, dp_replicate=R)


def cells(fig) -> dict[str, tuple]:
    """gid "<panel>/rank<r>" -> facecolour of every cell drawn."""
    return {p.get_gid(): p.get_facecolor() for ax in fig.axes for p in ax.patches if "/rank" in (p.get_gid() or "")}


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
