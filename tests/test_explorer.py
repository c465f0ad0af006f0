"""The explorer, driven like a user: set widget values, read the figure and the verdict."""

from __future__ import annotations

import pytest

from fsdp_nb.viz.explorer import Explorer, ExplorerSettings, explore, layer_specs, render


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
