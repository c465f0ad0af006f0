"""Tensor parallelism under FSDP2 on 4 ranks (2 data-parallel × 2 tensor-parallel), against one process.

Pure first: plan words and head counts, every refusal one line. Then ONE 4-rank
session for this module: the Layer's layout against what torch's own recipe gives,
and the GPT's Trainer run against one process on the whole batch.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from fsdp_nb.config import FSDPConfig
from fsdp_nb.data import ByteBlocks, ShardedBatches, stdlib_corpus
from fsdp_nb.models import GPT, GPTConfig, Layer
from fsdp_nb.session.output import Silent
from fsdp_nb.tensor_parallel import data_parallel_rank, plan_of, resolve_plan
from fsdp_nb.train import TrainConfig, Trainer

TRAIN = dict(steps=4, global_batch_size=8, lr=1e-3, weight_decay=0.1, warmup_steps=1, clip_norm=0.5, log_interval=0)
CORPUS_BYTES = 40_000


def one_line_error(fn, *args, kind=ValueError, **kwargs) -> str:
    with pytest.raises(kind) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---- pure: plans, words, heads ------------------------------------------------------------


def test_the_models_ship_plans_in_hugging_faces_words():
    layer = resolve_plan(Layer(), plan_of(Layer(), None), 2)
    assert [(name, style) for name, _, style in layer] == [("l1", "colwise"), ("l2", "rowwise")]
    gpt = resolve_plan(GPT(GPTConfig.debug()), plan_of(GPT(GPTConfig.debug()), None), 2)
    assert sorted((name, style) for name, _, style in gpt) == sorted(
        (f"blocks.{i}.{m}", s)
        for i in range(2)
        for m, s in (("attn.qkv", "colwise"), ("attn.proj", "rowwise"), ("mlp.fc", "colwise"), ("mlp.proj", "rowwise"))
    )


def test_refusals_are_one_line_and_say_what_works():
    message = one_line_error(resolve_plan, Layer(), {"l1": "colwise_rep"}, 2)
    assert message == "tp_plan['l1']='colwise_rep' is not a plan word fsdp_nb applies; accepted: colwise, rowwise"
    message = one_line_error(resolve_plan, GPT(GPTConfig.debug(n_head=1)), GPT.base_model_tp_plan, 2)
    assert message == (
        "tp_size=2 does not divide the 1 attention heads of GPT: each tensor-parallel rank computes whole heads; "
        "use tp_size in [1]"
    )
    assert "matches no submodule" in one_line_error(resolve_plan, Layer(), {"l9": "rowwise"}, 2)
    assert "does not split evenly" in one_line_error(resolve_plan, Layer(), {"l3": "colwise"}, 2)  # 3 rows
    assert "has no base_model_tp_plan" in one_line_error(plan_of, torch.nn.Linear(2, 2), None)
    message = one_line_error(FSDPConfig, fsdp_version=1, tp_size=2)
    assert message.endswith("accepted: tp_size=1, or fsdp_version=2")


def test_tp_peers_share_a_data_parallel_rank():
    assert [data_parallel_rank(r, 4, 2) for r in range(4)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert [data_parallel_rank(r, 4, 1) for r in range(4)] == [(r, 4) for r in range(4)]


# ---- 4 ranks: (dp_shard 2, tp 2) -------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks(session4):
    """The shared 4-rank session, with this module's setup run on it."""
    from conftest import ready

    run(ready(session4), RANK_SETUP)
    return session4


def run(session, *sources: str):
    return session.run("\n".join(textwrap.dedent(s) for s in sources), output=Silent()).raise_errors()


RANK_SETUP = """
import warnings
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from fsdp_nb.config import FSDPConfig
from fsdp_nb.data import ByteBlocks, stdlib_corpus
from fsdp_nb.models import GPT, GPTConfig, Layer
from fsdp_nb.optim import clip_sharded_grads
from fsdp_nb.sharding import shard
from fsdp_nb.train import Trainer, TrainConfig
warnings.filterwarnings("ignore")

def refusal(fn):
    try:
        fn()
    except Exception as e:
        return type(e).__name__, str(e)
"""


@pytest.mark.timeout(60)
def test_layer_under_tp_and_fsdp2_is_placed_as_torch_places_it(ranks):
    run(
        ranks,
        """
    torch.manual_seed(0); ours = shard(Layer(), FSDPConfig(tp_size=2))
    torch.manual_seed(0); given = shard(Layer(), FSDPConfig(tp_size=2), tp_plan={"l1": "colwise", "l2": "rowwise"})
    torch.manual_seed(0); theirs = Layer()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "tp"))
    parallelize_module(theirs, mesh["tp"], {"l1": ColwiseParallel(), "l2": RowwiseParallel()})
    fully_shard(theirs, mesh=mesh["dp_shard"])
    placed = {n: tuple(map(repr, p.placements)) for n, p in ours.named_parameters()}
    torch_placed = {n: tuple(map(repr, p.placements)) for n, p in theirs.named_parameters()}
    local = {n: p.to_local().clone() for n, p in ours.named_parameters()}
    given_local = {n: p.to_local().clone() for n, p in given.named_parameters()}
    torch_local = {n: p.to_local().clone() for n, p in theirs.named_parameters()}
    full = {n: p.full_tensor() for n, p in ours.named_parameters()}
    unknown_word = refusal(lambda: shard(Layer(), FSDPConfig(tp_size=2), tp_plan={"l1": "sequence_parallel"}))
    odd_heads = refusal(lambda: shard(GPT(GPTConfig.debug(n_head=1)), FSDPConfig(tp_size=2)))
    # gradients on two meshes: l1, l2 on (dp_shard, tp), l3 on dp_shard alone
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))  # (B, d_in), the same on every rank
    ours(x[4 * (rank // 2) : 4 * (rank // 2) + 4]).pow(2).mean().backward()  # TP peers: the same 4 rows
    grads = [p.grad for p in ours.parameters()]
    through_torch = refusal(lambda: torch.nn.utils.get_total_norm(grads))
    real_all_reduce, calls = torch.distributed.all_reduce, []
    torch.distributed.all_reduce = lambda *a, **k: calls.append(k) or real_all_reduce(*a, **k)
    import logging
    class Kept(logging.Handler):
        seen = []
        def emit(self, record):
            self.seen.append(record.getMessage())
    dtensor_log = logging.getLogger("torch.distributed.tensor")
    dtensor_log.addHandler(kept := Kept())
    try:
        norm = clip_sharded_grads(grads, max_norm=0.1)
        clip_logged, collectives = list(kept.seen), len(calls)
        torch.nn.utils.get_total_norm(grads[:2]).full_tensor()  # l1 alone, through DTensor: it logs
        dtensor_logged = kept.seen[len(clip_logged):]
    finally:
        torch.distributed.all_reduce = real_all_reduce
        dtensor_log.removeHandler(kept)
    clipped = {n: p.grad.full_tensor() for n, p in ours.named_parameters()}
    """,
    )
    torch.manual_seed(0)
    ref = dict(Layer().named_parameters())  # the one-process parameters all three started from
    for rank, placed in enumerate(ranks.eval("placed")):
        assert placed["l1.weight"] == ("_StridedShard(dim=0, sf=2)", "Shard(dim=0)")
        assert placed["l2.weight"] == ("Shard(dim=0)", "Shard(dim=1)")
        assert placed["l3.weight"] == ("Shard(dim=0)",)  # outside the plan: the dp mesh alone
        assert placed == ranks.eval("torch_placed")[rank]
    for local, given, theirs, full in zip(*(ranks.eval(k) for k in ("local", "given_local", "torch_local", "full"))):
        for name, value in ref.items():
            torch.testing.assert_close(local[name], theirs[name], rtol=0, atol=0, msg=name)
            torch.testing.assert_close(given[name], theirs[name], rtol=0, atol=0, msg=name)
            torch.testing.assert_close(full[name], value.detach(), rtol=0, atol=0, msg=name)
    # rank = s·T + t: l2.weight (6, 6) is split in columns by t, then in rows by s
    w2 = ref["l2.weight"].detach()
    for rank, local in enumerate(ranks.eval("local")):
        s, t = divmod(rank, 2)
        torch.testing.assert_close(local["l2.weight"], w2.chunk(2, dim=1)[t].chunk(2, dim=0)[s], rtol=0, atol=0)
    for kind, message in ranks.eval("unknown_word") + ranks.eval("odd_heads"):
        assert kind == "ValueError" and "\n" not in message, message
    assert ranks.eval("unknown_word")[0][1] == (
        "tp_plan['l1']='sequence_parallel' is not a plan word fsdp_nb applies; accepted: colwise, rowwise"
    )
    assert ranks.eval("odd_heads")[0][1].startswith("tp_size=2 does not divide the 1 attention heads of GPT")
    # the global gradient norm and clipping across the 2-D mesh, where torch's own stack fails
    torch.manual_seed(0)
    one = Layer()
    one(torch.randn(8, 4, generator=torch.Generator().manual_seed(1))).pow(2).mean().backward()
    ref_norm = float(torch.nn.utils.get_total_norm([p.grad for p in one.parameters()]))
    assert all(error is not None and "stack" in error[1] for error in ranks.eval("through_torch"))
    assert ranks.eval("collectives") == [1] * 4  # one scalar all-reduce over two meshes
    assert ranks.eval("clip_logged") == [[]] * 4  # no "2 sequential all_reduce operations" notice
    assert all(any("sequential all_reduce" in m for m in logged) for logged in ranks.eval("dtensor_logged"))
    scale = 0.1 / (ref_norm + 1e-6)
    for norm, clipped in zip(ranks.eval("norm"), ranks.eval("clipped")):
        assert norm == pytest.approx(ref_norm, rel=1e-5)
        for name, p in one.named_parameters():
            torch.testing.assert_close(clipped[name], p.grad * scale, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.timeout(60)
def test_trainer_with_fsdp2_and_tp_matches_one_process(ranks):
    run(
        ranks,
        f"""
    data = ByteBlocks(stdlib_corpus({CORPUS_BYTES}), 16)
    trainer = Trainer(GPT(GPTConfig.debug(), seed=0), data, TrainConfig(**{TRAIN!r}), fsdp=FSDPConfig(tp_size=2))
    history = trainer.fit()
    full = {{n: p.full_tensor() for n, p in trainer.model.named_parameters()}}
    rows = [trainer.train_batches.local_indices(s) for s in range({TRAIN["steps"]})]
    """,
    )
    data = ByteBlocks(stdlib_corpus(CORPUS_BYTES), 16)
    reference = Trainer(GPT(GPTConfig.debug(), seed=0), data, TrainConfig(**TRAIN))
    ref_history = reference.fit()
    ref_params = dict(reference.model.named_parameters())
    for history, full in zip(ranks.eval("history"), ranks.eval("full")):
        for key in ("loss", "grad_norm"):  # grad_norm: before clipping to 0.5, over the whole model
            torch.testing.assert_close(
                torch.tensor([h[key] for h in history]),
                torch.tensor([h[key] for h in ref_history]),
                rtol=1e-5,
                atol=0,
                msg=key,
            )
        assert history[0]["grad_norm"] > TRAIN["clip_norm"]  # so clipping did scale the step
        for name, value in ref_params.items():
            torch.testing.assert_close(full[name], value.detach(), rtol=1e-5, atol=1e-5, msg=name)
    # TP peers (ranks 0, 1 and 2, 3) take the same rows; the two pairs together the global batch
    rows = ranks.eval("rows")
    one_process = ShardedBatches(data, global_batch_size=8)
    assert rows[0] == rows[1] and rows[2] == rows[3]
    for step in range(TRAIN["steps"]):
        assert rows[0][step] + rows[2][step] == one_process.global_indices(step)


@pytest.mark.timeout(60)
def test_layout_model_equals_what_torch_built_on_real_ranks(ranks):
    """fsdp_nb's own `shard` on gloo (rank 0 scatters the TP pieces): every local value is the index the model names."""
    run(
        ranks,
        """
    @torch.no_grad()
    def indexed(module):  # every parameter holds its own flat indices (exact in fp32)
        for p in module.parameters():
            p.copy_(torch.arange(p.numel()).view(p.shape))
        return module

    tp_gpt = shard(indexed(GPT(GPTConfig.debug(), seed=0)), FSDPConfig(tp_size=2))
    tp_layer = shard(indexed(Layer()), FSDPConfig(tp_size=2))
    tp_values = {
        key: {n: p.to_local().flatten().long() for n, p in m.named_parameters()}
        for key, m in (("gpt", tp_gpt), ("layer", tp_layer))
    }
    """,
    )
    from fsdp_nb.layout import fsdp2_layout, specs_of

    for key, model in (("gpt", GPT(GPTConfig.debug(), seed=0)), ("layer", Layer())):
        lay = fsdp2_layout(specs_of(model), 4, tp=2, tp_plan=model.base_model_tp_plan)
        read = ranks.layout(f"tp_{key}")
        assert (read.tp, read.shard_size, read.observed_ranks) == (2, 2, (0, 1, 2, 3))
        assert read.tp_placements == lay.tp_placements and read.row_ranges == lay.row_ranges
        assert read.padded_rows == lay.padded_rows and read.bytes_per_rank == lay.bytes_per_rank
        memory = ranks.memory(f"tp_{key}")
        for rank, values in enumerate(ranks.eval("tp_values")):
            assert memory[rank].params == lay.bytes(rank), (key, rank)  # live storage bytes, padding included
            for name, local in values[key].items():
                assert read.placements(name) == lay.placements(name), name
                assert torch.equal(local, lay.elements(name, rank)), (key, name, rank)


def test_layout_magic_on_a_tp_module_draws_its_grid_and_says_why_fsdp1_has_none(ranks, capsys, monkeypatch):
    from conftest import _shell

    from fsdp_nb.layout.tp_plan import FSDP1_HAS_NO_TP
    from fsdp_nb.session import session as module

    run(ranks, "torch.manual_seed(0); tp_for_magic = shard(Layer(), FSDPConfig(tp_size=2))")
    shown = []
    monkeypatch.setattr("fsdp_nb.viz.show.show_figure", shown.append)
    shell, saved = _shell(), module._current
    ranks.activate()
    try:
        shell.run_line_magic("fsdp_layout", "tp_for_magic --memory")
    finally:
        module._current = saved
    out = capsys.readouterr().out
    assert "rank 1: l1.weight[3:5] l1.bias[3:5] l2.weight[0:3]" in out  # TP piece t=1, then shard s=0
    assert out.count(FSDP1_HAS_NO_TP) == 1 and "modelled for the same parameters" not in out
    texts = [t.get_text() for t in shown[0].findobj(lambda a: hasattr(a, "get_text"))]
    assert any("_StridedShard(dim=0, sf=2)" in t for t in texts), texts  # the mesh grid, with its placements
    assert len(shown) == 2  # the layout, then the memory per rank
