"""The explorer, driven like a user: set widget values, read the figure, the verdict and the bytes per rank."""

from __future__ import annotations

import pytest

from fsdp_nb.layout import fsdp1_layout, fsdp2_layout
from fsdp_nb.models import Layer
from fsdp_nb.viz.explorer import NO_TP_FSDP1, NOTE, Explorer, ExplorerSettings, explore, layer_specs, render

GROUPS = ("l1", "l2", "l3", "")  # fully_shard per layer, the explorer's default


def gids(fig, prefix, axes=None):
    chosen = fig.axes if axes is None else [fig.axes[axes]]
    return [p.get_gid() for ax in chosen for p in ax.patches if (p.get_gid() or "").startswith(prefix)]


@pytest.fixture
def explorer():
    return Explorer()


def test_defaults_show_both_versions_of_the_seed_layer(explorer):
    assert explorer.settings() == ExplorerSettings()
    assert [ax.get_title().split(":")[0] for ax in explorer.figure.axes] == ["FSDP1", "FSDP2"]
    assert "FSDP1: works." in explorer.text and "FSDP2: works." in explorer.text
    assert "93 elements + 1 padding = 94, 47 per rank" in explorer.text
    assert explorer.view.value.startswith("<svg") and ">rank 0<" in explorer.view.value  # text stays text


def test_each_change_redraws(explorer):
    explorer.controls["world_size"].value = 4
    assert gids(explorer.figure, "rank3/", 0)[:1] == ["rank3/l3.weight"]  # FSDP1's last chunk starts in l3.weight
    assert "47 per rank" not in explorer.text and "24 per rank" in explorer.text
    explorer.controls["d_out"].value = 2  # l3 gets 2 rows: ranks 2 and 3 of FSDP2 hold none of it
    fsdp2 = gids(explorer.figure, "rank", 1)
    assert "rank3/padding:l3.weight" in fsdp2 and "rank3/l3.weight" not in fsdp2 and "rank1/l3.weight" in fsdp2
    explorer.controls["version"].value = "2"
    assert len(explorer.figure.axes) == 1 and "FSDP1" not in explorer.text


def test_freezing_l1_is_an_fsdp1_error_unless_use_orig_params(explorer):
    explorer.controls["freeze_l1"].value = True
    assert (
        "FSDP1: torch raises at wrap time:\n  ValueError: Must flatten tensors with uniform `requires_grad` "
        "when `use_orig_params=False`"
    ) in explorer.text
    assert "l1.weight, l1.bias are frozen" in explorer.text
    banners = [" ".join(t.get_text().split()) for t in explorer.figure.axes[0].texts if t.get_gid() == "rejected"]
    assert len(banners) == 1 and "uniform `requires_grad`" in banners[0]
    assert "FSDP2: works." in explorer.text and "l1's DTensors keep requires_grad=False" in explorer.text
    explorer.controls["use_orig_params"].value = True
    assert "FSDP1: works." in explorer.text and "93 elements instead of 63" in explorer.text


def test_bf16_layer_is_an_fsdp1_error_and_an_fsdp2_choice_of_groups(explorer):
    explorer.controls["l2_bf16"].value = True
    explorer.controls["use_orig_params"].value = True  # does not help FSDP1 with dtypes
    assert (
        "ValueError: Must flatten tensors with uniform dtype but got torch.float32 and torch.bfloat16" in explorer.text
    )
    assert "FSDP2: works." in explorer.text and "own fully_shard group" in explorer.text
    explorer.controls["fsdp2_per_layer"].value = False
    assert (
        "FSDP2: torch raises at the first forward:\n  AssertionError: FSDP expects uniform original parameter dtype"
        in explorer.text
    )
    assert len([t for ax in explorer.figure.axes for t in ax.texts if t.get_gid() == "rejected"]) == 2


def test_render_is_pure_and_matches_the_specs():
    s = ExplorerSettings(world_size=3, d_in=2, d_hidden=5, d_out=4, freeze_l1=True, l2_bf16=True)
    specs = layer_specs(s)
    assert [(p.name, p.shape, str(p.dtype), p.requires_grad) for p in specs][:3] == [
        ("l1.weight", (5, 2), "torch.float32", False),
        ("l1.bias", (5,), "torch.float32", False),
        ("l2.weight", (5, 5), "torch.bfloat16", True),
    ]
    (fig_a, text_a), (fig_b, text_b) = render(s), render(s)
    assert text_a == text_b and gids(fig_a, "") == gids(fig_b, "")


@pytest.mark.parametrize(
    "bad", [dict(world_size=0), dict(world_size=9), dict(d_in=0), dict(d_hidden=33), dict(version="3")]
)
def test_settings_are_validated(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ExplorerSettings(**bad)


def test_explore_takes_settings_and_displays_as_a_widget():
    e = explore(world_size=8, version="1")
    assert e.controls["world_size"].value == 8 and len(e.figure.axes) == 1
    bundle = e._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_in_the_saved_notebooks_mode_the_explorer_is_its_picture_alone(monkeypatch):
    from fsdp_nb.viz.explorer import Explorer, ExplorerSettings

    explorer = Explorer(ExplorerSettings())
    live = explorer._repr_mimebundle_()
    live = live[0] if isinstance(live, tuple) else live
    assert "application/vnd.jupyter.widget-view+json" in live and live["image/png"]
    monkeypatch.setenv("FSDP_NB_COLLATE", "1")
    saved = explorer._repr_mimebundle_()
    saved = saved[0] if isinstance(saved, tuple) else saved
    assert "application/vnd.jupyter.widget-view+json" not in saved
    assert saved["image/png"] and "run the cell for the controls" in saved["text/plain"]


# ---- the mesh: replicas and tensor parallelism --------------------------------------------------------------------
def bytes_entries(layout) -> str:
    """The per-rank entries the text must show, from the layout itself (spaces as `flat` leaves them)."""
    return " ".join(f"r{r}={b.real}+{b.padding}" for r, b in enumerate(layout.bytes_per_rank))


def flat(text: str) -> str:
    return " ".join(text.split())  # the verdicts are folded at 110 columns


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(tp=0), "tp=0 must be an int in 1..8"),
        (dict(dp_replicate=9), "dp_replicate=9 must be an int in 1..8"),
        (dict(tp=True), "tp=True must be an int"),
        (dict(world_size=3, tp=2), r"tp=2 must divide world_size=3; accepted: \[1, 3\]"),
        (dict(world_size=8, dp_replicate=3), r"dp_replicate=3 must divide world_size=8; accepted: \[1, 2, 4, 8\]"),
        (dict(world_size=8, dp_replicate=4, tp=4, d_hidden=8), "dp_replicate=4 × tp=4 must divide world_size=8"),
        (dict(world_size=4, tp=4), r"tp must divide 6; accepted here: \[1, 2\]"),
    ],
)
def test_mesh_settings_are_refused_in_one_line(bad, message):
    with pytest.raises(ValueError, match=message) as e:
        ExplorerSettings(**bad)
    assert "\n" not in str(e.value)


def test_mesh_values_that_do_not_divide_leave_one_line_in_place_of_the_picture(explorer):
    explorer.controls["world_size"].value = 4
    explorer.controls["tp"].value = 2
    assert explorer.figure is not None
    explorer.controls["world_size"].value = 3  # tp=2 does not divide 3: no crash, one line, no picture
    assert explorer.figure is None and explorer.view.value == ""
    assert explorer.text.startswith("ExplorerSettings: tp=2 must divide world_size=3") and "\n" not in explorer.text
    assert explorer.text in explorer.message.value
    explorer.controls["world_size"].value = 4
    explorer.controls["d_hidden"].value = 5  # l1's rows and l2's columns do not split in two
    assert explorer.figure is None and "tp must divide 5" in explorer.text and "\n" not in explorer.text
    explorer.controls["d_hidden"].value = 8
    assert explorer.figure is not None and explorer.view.value.startswith("<svg")


def test_tp_draws_the_tp_layout_and_says_why_fsdp1_has_none(explorer):
    explorer.controls["world_size"].value = 8
    explorer.controls["dp_replicate"].value = 2
    explorer.controls["tp"].value = 2
    s = explorer.settings()
    lay = fsdp2_layout(layer_specs(s), 8, dp_replicate=2, tp=2, tp_plan=Layer.base_model_tp_plan, groups=GROUPS)
    fig = explorer.figure
    assert set(gids(fig, "", None)) >= {f"{p.name}/rank{r}" for p in lay.params for r in range(8)}  # every cell
    assert not gids(fig, "rank")  # no FSDP1 (or 1-D FSDP2) panel
    texts = [t.get_text() for t in fig.texts] + [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any("2 × 2 × 2 mesh" in t for t in texts)
    (note,) = [t.get_text() for t in fig.texts if t.get_gid() == "note"]
    assert flat(note) == NO_TP_FSDP1 and "FlatParameter" in note  # in the picture, not only in the text
    assert NO_TP_FSDP1 in flat(explorer.text) and "FSDP1: works" not in explorer.text
    assert "_StridedShard(dim=0, sf=2)" in explorer.text and "l3 is off the plan" in explorer.text
    assert bytes_entries(lay) in flat(explorer.text)
    assert f"largest: {max(b.total for b in lay.bytes_per_rank)} B" in explorer.text
    explorer.controls["version"].value = "2"  # FSDP2 alone: no sentence about FSDP1
    assert not [t for t in explorer.figure.texts if t.get_gid() == "note"] and "FSDP1" not in explorer.text
    explorer.controls["version"].value = "1"  # FSDP1 alone under TP: only the sentence
    assert not explorer.figure.axes and NO_TP_FSDP1 == flat(explorer.figure.texts[0].get_text())


def test_bytes_per_rank_compare_fsdp_hsdp_and_tp_at_one_world_size(explorer):
    explorer.controls["world_size"].value = 4
    largest = {}
    for R, T in [(1, 1), (2, 1), (1, 2)]:
        explorer.controls["dp_replicate"].value = R
        explorer.controls["tp"].value = T
        plan = Layer.base_model_tp_plan if T > 1 else None
        specs = layer_specs(explorer.settings())
        lay2 = fsdp2_layout(specs, 4, dp_replicate=R, tp=T, tp_plan=plan, groups=GROUPS)
        assert bytes_entries(lay2) in flat(explorer.text)
        if T == 1:
            lay1 = fsdp1_layout(specs, 4, dp_replicate=R)
            assert "FSDP1 bytes per rank" in explorer.text and bytes_entries(lay1) in flat(explorer.text)
        largest[(R, T)] = max(b.total for b in lay2.bytes_per_rank)
        assert f"largest: {largest[(R, T)]} B" in explorer.text
    assert largest[(2, 1)] > largest[(1, 1)]  # HSDP shards over 2 ranks, not 4


def test_hsdp_draws_replicas_at_their_shard_peers_place(explorer):
    explorer.controls["world_size"].value = 4
    explorer.controls["dp_replicate"].value = 2
    fsdp1 = {p.get_gid(): p.get_x() for p in explorer.figure.axes[0].patches if p.get_gid()}
    assert fsdp1["rank2/l1.weight"] == fsdp1["rank0/l1.weight"]  # rank 2 = (replica 1, shard 0) holds rank 0's chunk
    assert any(fsdp1[g] > 0 for g in fsdp1 if g.startswith("rank3/"))
    (note,) = [t.get_text() for t in explorer.figure.texts if t.get_gid() == "note"]
    assert "2 replicas × 2 shards" in note and "HSDP: 2 replicas of a 2-rank shard group" in explorer.text


def test_the_static_picture_follows_the_mesh_settings():
    e = Explorer(ExplorerSettings(world_size=4, tp=2))
    cells = {p.get_gid() for ax in e.first.axes for p in ax.patches}
    assert {f"{p.name}/rank{r}" for p in layer_specs(e.settings()) for r in range(4)} <= cells
    (note,) = [t.get_text() for t in e.first.texts if t.get_gid() == "note"]
    assert note.startswith(NOTE) and NO_TP_FSDP1 in flat(note)
    bundle = e._repr_mimebundle_()
    assert (bundle[0] if isinstance(bundle, tuple) else bundle)["image/png"]
