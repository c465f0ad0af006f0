"""Step traces of hybrid sharding (HSDP) on 4 ranks: the all-reduce across replicas, counted by FSDP's rules.

With a 2×2 mesh (2 replicas of 2 shards) each unit's gradient is reduce-scattered
within its replica and then all-reduced across replicas (FSDP2's `foreach_reduce`,
FSDP1 HYBRID_SHARD's `_reduce_grad`). So per step: one reduce-scatter per unit as in
1-D, one all-reduce across replicas per reduce-scatter, each after its unit's
reduce-scatter and carrying that reduce-scatter's output (its input / 2 shards), and
the all-gathers of 1-D. ONE 4-rank session for this module (a 2×2 mesh needs 4).
"""

from __future__ import annotations

import textwrap

import pytest

from fsdp_nb.session.output import Silent

SHARDS = 2  # dp_shard_size: 4 ranks / dp_replicate_size 2
CONFIGS = {
    "FSDP2 HSDP": dict(fsdp_version=2, dp_replicate_size=2),
    "FSDP1 HYBRID_SHARD": dict(fsdp_version=1, sharding_strategy="HYBRID_SHARD", dp_replicate_size=2),
    "FSDP2 1-D": dict(fsdp_version=2),  # the reference: no replicas, no replica all-reduce
}
SETUP = """
import warnings
warnings.filterwarnings("ignore")
from fsdp_nb import FSDPConfig, Trainer, TrainConfig, GPT, GPTConfig, trace_step
from fsdp_nb.data import ByteBlocks, stdlib_corpus
data = ByteBlocks(stdlib_corpus(40_000), 16)

def trainer(**fsdp):
    t = Trainer(GPT(GPTConfig.debug(), seed=0), data, TrainConfig(steps=50, global_batch_size=8, log_interval=0),
                fsdp=FSDPConfig(auto_wrap_policy="TRANSFORMER_BASED_WRAP", **fsdp))
    t.history.append(t.train_step(0))  # warm: FSDP's lazy init is not part of a step
    return t

traces = {label: trace_step(trainer(**fsdp), steps=1, label=label) for label, fsdp in configs.items()}
"""


@pytest.fixture(scope="module")
def traces(session4):
    """On the shared 4-rank session: one traced Trainer step per config."""
    from conftest import ready

    s = ready(session4)
    s.push(configs=CONFIGS)
    s.run(textwrap.dedent(SETUP), output=Silent()).raise_errors()
    return s.eval("traces")[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("label", ["FSDP2 HSDP", "FSDP1 HYBRID_SHARD"])
def test_each_reduce_scatter_is_followed_by_its_all_reduce_across_replicas(traces, label):
    trace = traces[label]
    units = len(trace.units)
    assert units == 3 and trace.units[0] == "", trace.units  # root + 2 blocks
    for r in trace.ranks:
        assert r.count("reduce_scatter", step=0) == units, (label, r.rank)  # one per unit, as in 1-D
        replica = r.count("replica_all_reduce", step=0)
        assert replica == r.count("replica_all_reduce", "backward", step=0) == units, (label, r.rank)
        gathers = r.count("all_gather", "forward", step=0), r.count("all_gather", "backward", step=0)
        assert gathers == (units, units - 1), (label, r.rank)  # the root stays gathered, as in 1-D
        assert all(s.phase == "step" for s in r.spans if s.kind == "all_reduce"), label  # the loss, the norm
        scatters = {s.unit: s for s in r.spans if s.kind == "reduce_scatter"}
        replicas = {s.unit: s for s in r.spans if s.kind == "replica_all_reduce"}
        assert set(replicas) == set(scatters) == set(trace.units), label
        for unit, rs in scatters.items():
            ar = replicas[unit]
            assert ar.start >= rs.end, (label, r.rank, unit)  # after its unit's reduce-scatter
            assert ar.nbytes * SHARDS == rs.nbytes and ar.dtype == rs.dtype, (label, unit)  # its output
    assert f"{units} reduce-scatters, {units} all-reduces across replicas" in trace.summary()


def test_one_dimensional_sharding_has_no_replica_all_reduce(traces):
    trace = traces["FSDP2 1-D"]
    assert [trace.count("replica_all_reduce", rank=r) for r in range(4)] == [0] * 4
    assert trace.count("reduce_scatter", step=0) == len(trace.units) == 3
    assert "across replicas" not in trace.summary()


def test_the_timeline_draws_the_all_reduce_across_replicas(traces):
    from matplotlib.colors import to_rgb

    from fsdp_nb.viz import plot_timeline
    from fsdp_nb.viz.timeline import COLORS

    trace = traces["FSDP2 HSDP"]
    fig = plot_timeline(trace)
    drawn = [p for p in fig.axes[0].patches if p.get_gid() == "replica_all_reduce"]
    assert len(drawn) == sum(r.count("replica_all_reduce") for r in trace.ranks) == 4 * 3
    assert all(p.get_facecolor()[:3] == pytest.approx(to_rgb(COLORS["replica_all_reduce"])) for p in drawn)
    assert COLORS["replica_all_reduce"] != COLORS["all_reduce"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "all-reduce across replicas" in legend and "all-reduce" in legend  # the step's own stay apart
