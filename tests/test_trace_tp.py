"""Step traces of FSDP2 + tensor parallelism (TP) on 4 ranks: TP's collectives, counted from the plan.

The mesh is (dp_shard=2, tp=2). What torch's ParallelStyles communicate
(torch/distributed/tensor/parallel/style.py, DTensor's redistributions):
- ColwiseParallel: the input becomes a Replicate DTensor (`from_local`, nothing sent), the
  weight is Shard(0), the output Shard(-1) stays local: no collective in forward. In backward
  the input's gradient is Partial (each TP rank holds its output columns' share) and is
  all-reduced back to Replicate: ONE all-reduce, when autograd computes that gradient.
- RowwiseParallel: the input is Shard(-1) (this rank's columns, local), the weight Shard(1):
  the output is Partial and is all-reduced to Replicate in forward: ONE all-reduce. Its
  Replicate gradient flows back unchanged: no collective in backward.
So one step runs one TP all-reduce in forward per rowwise layer, and one in backward per
colwise layer whose input needs a gradient.

What torch does that the plan alone does not say, measured here:
- The Layer's l1 (colwise) is its first layer: its input is the batch, which needs no
  gradient, so autograd never computes it and torch runs NO backward all-reduce. With an
  input that requires grad it runs the one the plan predicts.
- The GPT's fused qkv ([Note: fused qkv under TP] in fsdp_nb/models.py) adds, per block, one
  all-gather of its output along dim 2 in forward (`full_tensor`) and one reduce-scatter of
  that gradient in backward (`grad_placements=[Partial()]`).
- Outside forward and backward the step has its own all-reduces (the averaged loss, the
  gradient norm: one scalar each over the world, TP or not), recorded as "all_reduce" in
  phase "step", never as TP's.
FSDP's own all-gathers and reduce-scatters are those of plain FSDP2: TP changes their bytes,
not their number. Activation checkpointing is off. Runs on the shared 4-rank session.
"""

from __future__ import annotations

import textwrap

import pytest

from fsdp_nb.models import GPT, GPTConfig, Layer
from fsdp_nb.session.output import Silent
from fsdp_nb.tensor_parallel import plan_of, resolve_plan
from fsdp_nb.trace import TENSOR_PARALLEL

TP, DP, BATCH, BLOCK = 2, 2, 8, 16  # the GPT's blocks are (b, 16) tokens; the Layer's (b, 4), 4 inputs
ROWS = BATCH // DP  # TP peers share their data-parallel rank's rows
SETUP = f"""
import warnings
warnings.filterwarnings("ignore")
from fsdp_nb import FSDPConfig, Trainer, TrainConfig, GPT, GPTConfig, trace_step
from fsdp_nb.data import ByteBlocks, stdlib_corpus
from fsdp_nb.models import Layer

def layer_loss(grad_input):
    def loss(model, batch):
        x = batch[0].float() / 255  # ({ROWS}, 4): one block of 4 bytes as the Layer's 4 inputs
        return model(x.requires_grad_(grad_input)).pow(2).mean()
    return loss

def trainer(model, block, loss_fn=None, **fsdp):
    data = ByteBlocks(stdlib_corpus(20_000), block)
    t = Trainer(model, data, TrainConfig(steps=10, global_batch_size={BATCH}, log_interval=0),
                fsdp=FSDPConfig(fsdp_version=2, **fsdp), loss_fn=loss_fn)
    t.history.append(t.train_step(0))  # warm: FSDP's lazy init and DTensor's caches are not part of a step
    return t

gpt = dict(auto_wrap_policy="TRANSFORMER_BASED_WRAP")
traces = {{
    "Layer TP": trace_step(trainer(Layer(), 4, layer_loss(False), tp_size={TP})),
    "Layer TP, input needs grad": trace_step(trainer(Layer(), 4, layer_loss(True), tp_size={TP})),
    "GPT TP": trace_step(trainer(GPT(GPTConfig.debug(), seed=0), {BLOCK}, tp_size={TP}, **gpt)),
    "GPT": trace_step(trainer(GPT(GPTConfig.debug(), seed=0), {BLOCK}, **gpt)),
}}
"""


@pytest.fixture(scope="module")
def traces(session4):
    """On the shared 4-rank session: one traced Trainer step per model."""
    from conftest import ready

    s = ready(session4)
    s.run(textwrap.dedent(SETUP), output=Silent()).raise_errors()
    return s.eval("traces")[0]


# ---- what the plan predicts ---------------------------------------------------------------------------


def unit_of(name: str, units: tuple[str, ...]) -> str:
    """The innermost FSDP unit holding module `name` ("" is the root)."""
    return max((u for u in units if u == "" or name == u or name.startswith(u + ".")), key=len)


def expected(model, units: tuple[str, ...], first_input_grad: bool = True) -> dict[tuple[str, str, str], int]:
    """{(unit, phase, kind): count} of TP's collectives in one step, from the model's plan and ParallelStyle rules.

    A colwise layer's input gradient is all-reduced only when autograd computes it: not for a
    first layer fed the batch (`first_input_grad=False`). A fused qkv also gathers its output."""
    counts: dict[tuple[str, str, str], int] = {}

    def add(unit, phase, kind):
        counts[(unit, phase, kind)] = counts.get((unit, phase, kind), 0) + 1

    first = next(name for name, m in model.named_modules() if list(m.parameters(recurse=False)))
    for name, _, style in resolve_plan(model, plan_of(model, None), TP):
        unit = unit_of(name, units)
        if style == "rowwise":
            add(unit, "forward", "tp_all_reduce")
        elif name != first or first_input_grad:
            add(unit, "backward", "tp_all_reduce")
        if name.endswith("attn.qkv"):  # [Note: fused qkv under TP]
            add(unit, "forward", "tp_all_gather")
            add(unit, "backward", "tp_reduce_scatter")
    return counts


def recorded(rank_trace) -> dict[tuple[str, str, str], int]:
    counts: dict[tuple[str, str, str], int] = {}
    for s in rank_trace.spans:
        if s.kind in TENSOR_PARALLEL:
            counts[(s.unit, s.phase, s.kind)] = counts.get((s.unit, s.phase, s.kind), 0) + 1
    return counts


CASES = {  # label -> (model, first layer's input needs grad)
    "Layer TP": (Layer(), False),
    "Layer TP, input needs grad": (Layer(), True),
    "GPT TP": (GPT(GPTConfig.debug()), True),
}


def test_the_plan_predicts_what_the_docstring_says():
    """Guard the guard: the derivation gives the numbers worked out by hand above."""
    assert expected(Layer(), ("",), False) == {("", "forward", "tp_all_reduce"): 1}
    assert expected(Layer(), ("",), True) == {("", "forward", "tp_all_reduce"): 1, ("", "backward", "tp_all_reduce"): 1}
    gpt = expected(GPT(GPTConfig.debug()), ("", "blocks.0", "blocks.1"))
    for unit in ("blocks.0", "blocks.1"):
        assert gpt[(unit, "forward", "tp_all_reduce")] == gpt[(unit, "backward", "tp_all_reduce")] == 2
        assert gpt[(unit, "forward", "tp_all_gather")] == gpt[(unit, "backward", "tp_reduce_scatter")] == 1
    assert len(gpt) == 8


# ---- what the trace recorded -----------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("label", list(CASES))
def test_tp_collectives_per_unit_and_phase_are_the_plans(traces, label):
    trace = traces[label]
    model, first_input_grad = CASES[label]
    want = expected(model, trace.units, first_input_grad)
    for r in trace.ranks:
        assert recorded(r) == want, (label, r.rank)
        assert {s.step for s in r.spans if s.kind in TENSOR_PARALLEL} == {0}
    total = sum(want.values())
    forward = sum(n for (_, phase, _), n in want.items() if phase == "forward")
    assert f"TP collectives {forward} forward + {total - forward} backward" in trace.summary()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("label", list(CASES))
def test_each_tp_collective_lies_inside_its_units_forward_or_backward(traces, label):
    """From its call to the end of the wait on its result, inside the span of the unit it ran in."""
    for r in traces[label].ranks:
        units = {(s.unit, s.kind): s for s in r.spans if s.kind in ("forward", "backward")}
        tp = [s for s in r.spans if s.kind in TENSOR_PARALLEL]
        assert tp, label
        for s in tp:
            around = units[(s.unit, s.phase)]
            assert around.start <= s.start <= s.end <= around.end, (label, r.rank, s, around)


@pytest.mark.timeout(120)
def test_tp_collectives_send_what_the_layers_compute(traces):
    """Bytes sent, from the shapes: a rowwise output (rows, out), a colwise input gradient (rows, in), fp32."""
    layer, gpt = Layer(), GPTConfig.debug()
    for r in traces["Layer TP, input needs grad"].ranks:
        sent = {s.phase: s.nbytes for s in r.spans if s.kind == "tp_all_reduce"}
        assert sent == {"forward": ROWS * layer.l2.out_features * 4, "backward": ROWS * layer.l1.in_features * 4}
    activation = ROWS * BLOCK * gpt.n_embd * 4  # (rows, T, C) fp32
    for r in traces["GPT TP"].ranks:
        by_kind = {}
        for s in r.spans:
            if s.kind in TENSOR_PARALLEL:
                by_kind.setdefault(s.kind, set()).add(s.nbytes)
        qkv = 3 * activation
        assert by_kind == {"tp_all_reduce": {activation}, "tp_all_gather": {qkv // TP}, "tp_reduce_scatter": {qkv}}
        assert all(s.dtype == "float32" for s in r.spans if s.kind in TENSOR_PARALLEL)


@pytest.mark.timeout(120)
def test_tp_leaves_fsdps_own_collectives_as_plain_fsdp2_runs_them(traces):
    plain, tp = traces["GPT"], traces["GPT TP"]
    assert plain.units == tp.units == ("", "blocks.0", "blocks.1")
    for a, b in zip(plain.ranks, tp.ranks):
        for kind in ("all_gather", "reduce_scatter", "replica_all_reduce", "wait"):
            for phase in ("forward", "backward"):
                per_unit = [sorted(s.unit for s in t.spans if s.kind == kind and s.phase == phase) for t in (a, b)]
                assert per_unit[0] == per_unit[1], (kind, phase, a.rank)
        assert b.count("all_gather", "forward") == 3 and b.count("reduce_scatter") == 3
        assert all(s.phase in ("forward", "backward") for s in b.spans if s.kind in TENSOR_PARALLEL)
        # the step's own: the averaged loss and the gradient norm, one scalar all-reduce each, TP or not
        assert b.count("all_reduce", "step") == a.count("all_reduce", "step") == 2


@pytest.mark.timeout(120)
def test_plain_fsdp2_records_no_tp_collective(traces):
    trace = traces["GPT"]
    assert [sum(trace.count(k, rank=r) for k in TENSOR_PARALLEL) for r in range(4)] == [0] * 4
    assert "TP collectives" not in trace.summary()


@pytest.mark.timeout(120)
def test_the_timeline_draws_tp_collectives_in_their_own_colours(traces):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_rgb

    from fsdp_nb.viz import plot_timeline
    from fsdp_nb.viz.timeline import COLORS, LABELS

    trace = traces["GPT TP"]
    fig = plot_timeline(trace)
    for kind in TENSOR_PARALLEL:
        drawn = [p for p in fig.axes[0].patches if p.get_gid() == kind]
        assert len(drawn) == sum(r.count(kind) for r in trace.ranks) > 0, kind
        assert all(p.get_facecolor()[:3] == pytest.approx(to_rgb(COLORS[kind])) for p in drawn), kind
    assert len(set(COLORS.values())) == len(COLORS)  # no kind shares a colour
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"TP all-reduce", "TP all-gather", "TP reduce-scatter", "all-gather", "all-reduce"} <= set(legend)
    assert legend == [LABELS[k] for k in COLORS if k in {s.kind for r in trace.ranks for s in r.spans}]
    renderer = FigureCanvasAgg(fig).get_renderer()  # ten kinds: two rows, not one running off a 950 px output area
    fig.draw(renderer)
    assert fig.legends[0].get_window_extent(renderer).width <= fig.bbox.width
