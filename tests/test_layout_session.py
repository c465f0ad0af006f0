"""Layouts read from the real 2-rank session: the seed's cases, and what torch refuses."""

from __future__ import annotations

import dataclasses

import pytest

from fsdp_nb.layout import Fsdp1Layout, Fsdp2Layout, fsdp1_layout, fsdp2_layout, specs_of
from fsdp_nb.models import Layer

pytestmark = pytest.mark.timeout(90)

FSDP1 = """
import torch.distributed.fsdp as F
from fsdp_nb.models import Layer
torch.manual_seed(0)
m1 = F.FullyShardedDataParallel(Layer(), device_id=torch.device("cpu"), use_orig_params={orig})
"""
FSDP2 = """
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from fsdp_nb.models import Layer
mesh = init_device_mesh("cpu", (world_size,))
m2 = Layer()
fully_shard(m2, mesh=mesh)
"""


def test_fsdp1_real_layout_matches_the_seed_and_the_model(session):
    session.run(FSDP1.format(orig=False)).raise_errors()
    lay = session.layout("m1")
    assert isinstance(lay, Fsdp1Layout) and lay.observed_ranks == (0, 1)
    assert (lay.total_numel, lay.padding_numel, lay.padded_numel) == (93, 1, 94)
    assert lay.segments(0) == (("l1.weight", 0, 24), ("l1.bias", 0, 6), ("l2.weight", 0, 17))
    assert lay.segments(1) == (
        ("l2.weight", 17, 36),
        ("l2.bias", 0, 6),
        ("l3.weight", 0, 18),
        ("l3.bias", 0, 3),
        (None, 0, 1),
    )
    assert dataclasses.replace(lay, observed_ranks=()) == fsdp1_layout(specs_of(Layer()), 2)


def test_fsdp1_use_orig_params_true_matches_the_model(session):
    session.run(FSDP1.format(orig=True)).raise_errors()
    lay = session.layout("m1")
    assert lay.shards == fsdp1_layout(specs_of(Layer()), 2, use_orig_params=True).shards


def test_fsdp2_real_local_shapes(session):
    session.run(FSDP2).raise_errors()
    lay = session.layout("m2")
    assert isinstance(lay, Fsdp2Layout)
    assert [lay.local_shape("l3.weight", r) for r in (0, 1)] == [(2, 6), (1, 6)]
    assert lay.row_ranges == fsdp2_layout(specs_of(Layer()), 2).row_ranges
    shapes = session.eval("[tuple(p.to_local().shape) for p in m2.parameters()]")
    assert shapes[1][4] == (1, 6) and shapes[0][4] == (2, 6)


def test_memory_per_rank_counts_padding(session):
    session.run(
        FSDP1.format(orig=False) + "opt = torch.optim.Adam(m1.parameters())\n"
        "m1(torch.randn(2, 4)).sum().backward()\nopt.step()"
    ).raise_errors()
    reports = session.memory("m1", "opt")
    assert [m.rank for m in reports] == [0, 1]
    assert [m.params.real + m.params.padding for m in reports] == [47 * 4, 47 * 4]
    assert reports[1].params.padding == 4 and reports[0].params.padding == 0
    assert all(m.grads.total == 47 * 4 for m in reports)
    assert all(m.optimizer.total >= 2 * 47 * 4 for m in reports)  # exp_avg + exp_avg_sq


def test_freezing_l1_under_fsdp1_is_refused_and_explained_fsdp2_trains(session):
    res = session.run(
        FSDP1.replace("m1 = ", "layer = Layer()\nlayer.l1.requires_grad_(False)\nm1 = ")
        .replace("F.FullyShardedDataParallel(Layer()", "F.FullyShardedDataParallel(layer")
        .format(orig=False)
    )
    err = res.errors[0][1]
    assert err.type == "ValueError" and "uniform `requires_grad`" in err.message
    predicted = fsdp1_layout(specs_of(_frozen_layer()), 2)
    assert predicted.raises == f"ValueError: {err.message}" and "frozen" in predicted.errors[0].message
    assert any(line.startswith("fsdp_nb explains: FSDP1 with use_orig_params=False concatenates") for line in err.short)
    session.run(
        FSDP2.replace(
            "m2 = Layer()", "m2 = Layer()\nm2.l1.requires_grad_(False)\nbefore = m2.l1.weight.detach().clone()"
        )
        + "opt = torch.optim.SGD([p for p in m2.parameters() if p.requires_grad], lr=0.1)\n"
        "w2 = m2.l2.weight.full_tensor().clone()\n"
        "m2(torch.randn(4, 4)).sum().backward()\nopt.step()"
    ).raise_errors()
    frozen_same, l2_changed = zip(
        *session.eval(
            "(torch.equal(m2.l1.weight.full_tensor(), before), not torch.equal(w2, m2.l2.weight.full_tensor()))"
        )
    )
    assert all(frozen_same) and all(l2_changed)


def _frozen_layer():
    layer = Layer()
    layer.l1.requires_grad_(False)
    return layer


def test_bf16_layer_in_one_fsdp2_group_fails_at_first_forward_in_its_own_group_works(session):
    res = session.run(
        FSDP2.replace("fully_shard(m2, mesh=mesh)", "m2.l2.to(torch.bfloat16)\nfully_shard(m2, mesh=mesh)")
        + "m2(torch.randn(2, 4))"
    )
    err = res.errors[0][1]
    assert err.type == "AssertionError" and "uniform original parameter dtype" in err.message
    assert any(line.startswith("fsdp_nb explains: One fully_shard group all-gathers") for line in err.short)
    session.run(
        FSDP2.replace(
            "fully_shard(m2, mesh=mesh)",
            "m2.l2.to(torch.bfloat16)\nfully_shard(m2.l2, mesh=mesh)\nfully_shard(m2, mesh=mesh)",
        )
        + "with torch.autocast('cpu', dtype=torch.bfloat16):\n    out = m2(torch.randn(2, 4))\n"
        "out.float().sum().backward()"
    ).raise_errors()
    assert session.eval("(m2.l2.weight.dtype, m2.l1.weight.dtype)") == [(torch_bf16(), torch_f32())] * 2


def torch_bf16():
    import torch

    return torch.bfloat16


def torch_f32():
    import torch

    return torch.float32


def test_layout_magic_prints_tables_and_draws(ipshell, session, capsys, monkeypatch):
    shown = []
    monkeypatch.setattr("fsdp_nb.viz.show.show_figure", shown.append)
    session.run(FSDP1.format(orig=False) + "opt = torch.optim.Adam(m1.parameters())").raise_errors()
    ipshell.run_line_magic("fsdp_layout", "m1 --memory opt")
    out = capsys.readouterr().out
    assert "rank 0: l1.weight[0:24] l1.bias[0:6] l2.weight[0:17]" in out
    assert "rank 1: l2.weight[17:36] l2.bias[0:6] l3.weight[0:18] l3.bias[0:3] pad[1]" in out
    assert "FSDP2 (world size 2)" in out and "rank 1:" in out
    assert len(shown) == 2 and "FSDP1 (read from the ranks) | FSDP2 (modelled)" in shown[0]._suptitle.get_text()


def test_layout_magic_errors(ipshell, session):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="ranks 0,1 have no .nothing_here.; build and shard it"):
        ipshell.run_line_magic("fsdp_layout", "nothing_here")
    session.run("plain = torch.nn.Linear(2, 2)")
    with pytest.raises(UsageError, match="is not sharded"):
        ipshell.run_line_magic("fsdp_layout", "plain")
    with pytest.raises(UsageError, match="not a variable name"):
        ipshell.run_line_magic("fsdp_layout", "'x'")
