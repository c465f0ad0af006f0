"""Figures and text tables, read back from what was drawn (patches, gids, texts), not pixels."""

from __future__ import annotations

import io

import pytest
import torch

from fsdp_nb.layout import ParamSpec, RankBytes, fsdp1_layout, fsdp2_layout, specs_of
from fsdp_nb.layout.memory import MemoryReport
from fsdp_nb.models import Layer
from fsdp_nb.viz import (
    format_fsdp1,
    format_fsdp2,
    format_memory,
    format_shapes,
    plot_comparison,
    plot_fsdp1,
    plot_fsdp2,
    plot_memory,
)

SPECS = specs_of(Layer())


def drawn(fig, prefix=""):
    """(gid, patch) of every patch in the figure whose gid starts with prefix, in drawing order."""
    return [(p.get_gid(), p) for ax in fig.axes for p in ax.patches if p.get_gid() and p.get_gid().startswith(prefix)]


def texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_fsdp1_figure_shows_the_flat_parameter_and_each_rank_chunk():
    fig = plot_fsdp1(fsdp1_layout(SPECS, 2))
    assert [g for g, _ in drawn(fig, "flat/")] == [f"flat/{s.name}" for s in SPECS] + ["flat/padding"]
    assert [g for g, _ in drawn(fig, "rank0/")] == ["rank0/l1.weight", "rank0/l1.bias", "rank0/l2.weight"]
    assert [g for g, _ in drawn(fig, "rank1/")] == [
        "rank1/l2.weight",
        "rank1/l2.bias",
        "rank1/l3.weight",
        "rank1/l3.bias",
        "rank1/padding",
    ]
    # l2.weight straddles the cut: two pieces, 17 + 19 elements wide, each labelled with its range
    widths = [p.get_width() for g, p in drawn(fig) if g.endswith("/l2.weight") and g.startswith("rank")]
    assert widths == [17, 19]
    assert {"l2.weight\n[0:17]", "l2.weight\n[17:36]", "l1.bias\n[0:6]"} <= set(texts(fig))
    padding = [p for g, p in drawn(fig) if g.endswith("padding")]
    assert len(padding) == 2 and all(p.get_hatch() == "///" for p in padding)
    assert all(p.get_hatch() is None for g, p in drawn(fig) if not g.endswith("padding"))
    (cut,) = fig.axes[0].lines  # one cut between two ranks, at element 47
    assert list(cut.get_xdata()) == [47, 47]
    assert "rank 1" in texts(fig) and "FlatParameter" in texts(fig)


def test_fsdp1_figure_with_alignment_padding():
    lay = fsdp1_layout(SPECS, 4, use_orig_params=True)
    fig = plot_fsdp1(lay)
    for r in range(4):
        got = [g.split("/", 1)[1] for g, _ in drawn(fig, f"rank{r}/")]
        assert got == [s.name or "padding" for s in lay.segments(r)]
    assert len(fig.axes[0].lines) == 3
    assert len(drawn(fig, "flat/padding")) == sum(1 for s in lay.flat if s.name is None)


def test_fsdp2_figure_splits_rows_and_shows_uneven_padding():
    fig = plot_fsdp2(fsdp2_layout(SPECS, 2))
    assert [g for g, _ in drawn(fig, "rank0/")] == [f"rank0/{s.name}" for s in reversed(SPECS)]
    rank1 = dict(drawn(fig, "rank1/"))
    assert rank1["rank1/l3.weight"].get_height() == 1 and rank1["rank1/padding:l3.weight"].get_height() == 1
    assert rank1["rank1/padding:l3.weight"].get_hatch() == "///"
    assert sorted(g for g in rank1 if "padding" in g) == ["rank1/padding:l3.bias", "rank1/padding:l3.weight"]
    assert rank1["rank1/l2.weight"].get_height() == 3
    assert {"[2:3]\n(1, 6)", "[0:2]\n(2, 6)", "[3:6]\n(3,)"} <= set(texts(fig))


def test_fsdp2_figure_shows_empty_shards():
    fig = plot_fsdp2(fsdp2_layout(SPECS, 8))
    gids = {g for g, _ in drawn(fig)}
    assert "rank7/l3.weight" not in gids and "rank7/padding:l3.weight" in gids
    assert "rank2/l3.weight" in gids and "rank3/l3.weight" not in gids
    assert texts(fig).count("empty\n(0, 6)") == 5 + 2  # l3.weight on ranks 3..7, l1/l2.weight on ranks 6..7 (x2)


def test_comparison_puts_both_versions_side_by_side():
    fig = plot_comparison(fsdp1_layout(SPECS, 2), fsdp2_layout(SPECS, 2))
    assert len(fig.axes) == 2
    assert fig.axes[0].get_title().startswith("FSDP1") and fig.axes[1].get_title().startswith("FSDP2")
    assert len(drawn(fig, "rank1/")) == 5 + 6 + 2
    with pytest.raises(ValueError, match="world sizes differ"):
        plot_comparison(fsdp1_layout(SPECS, 2), fsdp2_layout(SPECS, 3))
    with pytest.raises(ValueError, match="different parameters"):
        plot_comparison(fsdp1_layout(SPECS, 2), fsdp2_layout(SPECS[:2], 2))


def test_rejected_configuration_is_labelled_with_torchs_error():
    specs = [ParamSpec(name=s.name, shape=s.shape, requires_grad=not s.name.startswith("l1")) for s in SPECS]
    fig = plot_fsdp1(fsdp1_layout(specs, 2))
    (banner,) = [" ".join(t.get_text().split()) for t in fig.axes[0].texts if t.get_gid() == "rejected"]  # folded
    assert "Must flatten tensors with uniform `requires_grad`" in banner
    assert all(p.get_alpha() == 0.25 for _, p in drawn(fig, "rank"))
    assert not [t for t in plot_fsdp1(fsdp1_layout(SPECS, 2)).axes[0].texts if t.get_gid() == "rejected"]


def test_memory_bars_from_layouts():
    fig = plot_memory({"FSDP1": fsdp1_layout(SPECS, 2), "FSDP2": fsdp2_layout(SPECS, 2)})
    bars = {g: p.get_height() for g, p in drawn(fig)}
    assert bars == {
        "rank0/FSDP1/real": 188,
        "rank1/FSDP1/real": 184,
        "rank1/FSDP1/padding": 4,
        "rank0/FSDP2/real": 200,
        "rank1/FSDP2/real": 172,
        "rank1/FSDP2/padding": 28,
    }
    assert all(p.get_hatch() == "///" for g, p in drawn(fig) if g.endswith("padding"))
    assert len(drawn(plot_memory(fsdp1_layout(SPECS, 4)))) == 4 + 1  # only the last rank pads


def test_memory_bars_from_reports_stack_params_grads_optimizer():
    reports = [
        MemoryReport(
            rank=r,
            world_size=2,
            params=RankBytes(real=184, padding=4 * r),
            grads=RankBytes(real=184, padding=4 * r),
            optimizer=RankBytes(real=372, padding=0),
        )
        for r in (1, 0)
    ]
    fig = plot_memory(reports)
    got = [(g, p.get_height(), p.get_y()) for g, p in drawn(fig, "rank1/")]
    assert got == [
        ("rank1/params/real", 184, 0),
        ("rank1/params/padding", 4, 184),
        ("rank1/grads/real", 184, 188),
        ("rank1/grads/padding", 4, 372),
        ("rank1/optimizer/real", 372, 376),
    ]
    assert len(drawn(fig, "rank0/")) == 3
    with pytest.raises(TypeError, match="not a mix"):
        plot_memory([reports[0], fsdp1_layout(SPECS, 2)])


def test_figures_render_without_pyplot():
    buf = io.BytesIO()
    plot_comparison(fsdp1_layout(SPECS, 3, use_orig_params=True), fsdp2_layout(SPECS, 3)).savefig(buf, format="png")
    assert buf.getvalue().startswith(b"\x89PNG")


def test_text_tables_are_exact():
    assert format_fsdp1(fsdp1_layout(SPECS, 2)) == (
        "FSDP1 FlatParameter (use_orig_params=False, world size 2): 93 elements + 1 padding = 94, 47 per rank\n"
        "rank 0: l1.weight[0:24] l1.bias[0:6] l2.weight[0:17]\n"
        "rank 1: l2.weight[17:36] l2.bias[0:6] l3.weight[0:18] l3.bias[0:3] pad[1]"
    )
    assert format_fsdp2(fsdp2_layout(SPECS, 2)).splitlines()[1:] == [
        "rank 0: l1.weight[0:3] l1.bias[0:3] l2.weight[0:3] l2.bias[0:3] l3.weight[0:2] l3.bias[0:2]",
        "rank 1: l1.weight[3:6] l1.bias[3:6] l2.weight[3:6] l2.bias[3:6] l3.weight[2:3]+1pad l3.bias[2:3]+1pad",
    ]
    assert format_shapes(fsdp2_layout(SPECS, 2)).splitlines()[5] == "l3.weight  (3, 6)  (2, 6)  (1, 6)"
    bf16 = [
        ParamSpec(name=s.name, shape=s.shape, dtype=torch.bfloat16 if "l2" in s.name else torch.float32) for s in SPECS
    ]
    assert "error at wrap time: ValueError: Must flatten tensors with uniform dtype" in format_fsdp1(
        fsdp1_layout(bf16, 2)
    )
    report = MemoryReport(
        rank=0,
        world_size=1,
        params=RankBytes(real=8, padding=4),
        grads=RankBytes(real=0, padding=0),
        optimizer=RankBytes(real=16, padding=0),
    )
    assert format_memory([report]).splitlines()[1].split() == ["0", "8+4", "0+0", "16+0", "28"]
