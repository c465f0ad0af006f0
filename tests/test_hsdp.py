"""Meshes in Accelerate's names, and hybrid sharding (HSDP) on 4 ranks against torch and one process.

Pure first: the sizes (`dp_replicate_size`, `dp_shard_size`, `tp_size`) from the config,
Accelerate's YAML section and variables, and every refusal as one line. Then ONE
4-rank session for this module (the shared session has 2 ranks; a 2×2 mesh needs 4),
on which layouts are compared with what torch builds from the same mesh, and the
Trainer's HSDP runs with one process on the whole batch.
"""

from __future__ import annotations

import textwrap
import warnings

import pytest
import torch

from fsdp_nb.config import FSDPConfig
from fsdp_nb.convert import convert_to_fsdp2
from fsdp_nb.data import ByteBlocks, ShardedBatches, stdlib_corpus
from fsdp_nb.models import GPT, GPTConfig, Layer
from fsdp_nb.parallelism import MeshPlan, plan_mesh
from fsdp_nb.session.output import Silent
from fsdp_nb.train import TrainConfig, Trainer

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32
TRAIN = dict(steps=6, global_batch_size=8, lr=1e-3, weight_decay=0.1, warmup_steps=2, clip_norm=0.5, log_interval=0)
CORPUS_BYTES = 40_000


def quiet(**kwargs) -> FSDPConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FSDPConfig(**kwargs)


def one_line_error(fn, *args, kind=ValueError, **kwargs) -> str:
    with pytest.raises(kind) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---- pure: sizes, Accelerate's spellings ---------------------------------------------------


def test_defaults_are_one_replica_all_ranks_sharding_no_tp():
    c = FSDPConfig()
    assert (c.dp_replicate_size, c.dp_shard_size, c.tp_size) == (1, None, 1)
    assert plan_mesh(c, 4) == MeshPlan(shape=(4,))  # dp_shard_size None: world / (R·T)
    assert plan_mesh(FSDPConfig(dp_replicate_size=2), 4).shape == (2, 2)
    assert plan_mesh(FSDPConfig(dp_replicate_size=2, dp_shard_size=4), 8).shape == (2, 4)
    assert plan_mesh(FSDPConfig(dp_shard_size=8), 8).shape == (8,)
    assert plan_mesh(quiet(sharding_strategy="HYBRID_SHARD", dp_replicate_size=2), 4).shape == (2, 2)


def test_fsdp1_hybrid_takes_the_nodes_as_replicas():
    hybrid = FSDPConfig(fsdp_version=1, sharding_strategy="HYBRID_SHARD")
    assert plan_mesh(hybrid, 8, local_world_size=4) == MeshPlan(shape=(2, 4), strategy="HYBRID_SHARD")
    zero2 = FSDPConfig(fsdp_version=1, sharding_strategy="HYBRID_SHARD_ZERO2", dp_replicate_size=2)
    assert plan_mesh(zero2, 4) == MeshPlan(shape=(2, 2), strategy="HYBRID_SHARD_ZERO2")  # the size wins on 1 node
    assert plan_mesh(FSDPConfig(fsdp_version=1), 4) == MeshPlan(shape=(4,), strategy="FULL_SHARD")


@pytest.mark.parametrize("strategy, runs_as", [("HYBRID_SHARD", "FULL_SHARD"), ("HYBRID_SHARD_ZERO2", "SHARD_GRAD_OP")])
def test_fsdp1_hybrid_on_one_machine_runs_unhybrid_and_says_so(strategy, runs_as):
    plan = plan_mesh(FSDPConfig(fsdp_version=1, sharding_strategy=strategy), 4, local_world_size=4)
    assert (plan.shape, plan.strategy) == ((4,), runs_as)
    assert plan.note == (
        f"sharding_strategy='{strategy}' replicates across nodes, and this session is one machine "
        f"(world 4 / LOCAL_WORLD_SIZE 4 = 1 node, so R = 1): it runs as {runs_as}; "
        "to replicate across groups of ranks here, set dp_replicate_size to one of [2]"
    )
    assert plan_mesh(FSDPConfig(fsdp_version=1, sharding_strategy=strategy, dp_replicate_size=2), 4).note is None


def test_yaml_section_reads_and_round_trips():
    file = {
        "distributed_type": "FSDP",
        "fsdp_config": {"fsdp_version": 2},
        "parallelism_config": {
            "parallelism_config_dp_replicate_size": 2,
            "parallelism_config_dp_shard_size": "2",  # a quoted number reads as one
            "parallelism_config_tp_size": 1,
            "parallelism_config_cp_size": 1,  # off: accepted
            "parallelism_config_cp_comm_strategy": "allgather",  # matters only with cp_size > 1
        },
    }
    c = FSDPConfig.from_accelerate(file)
    assert (c.dp_replicate_size, c.dp_shard_size, c.tp_size) == (2, 2, 1)
    written = c.to_accelerate()
    assert written["parallelism_config"] == {
        "parallelism_config_dp_replicate_size": 2,
        "parallelism_config_dp_shard_size": 2,
        "parallelism_config_tp_size": 1,
    }
    assert FSDPConfig.from_accelerate(written) == c
    assert "parallelism_config" not in FSDPConfig().to_accelerate()  # a 1-D config writes what it always wrote
    only_r = FSDPConfig(dp_replicate_size=2).to_accelerate()["parallelism_config"]
    assert "parallelism_config_dp_shard_size" not in only_r  # None is resolved later, not written


@pytest.mark.parametrize(
    "section, problem",
    [
        (
            {"dp_replicate_size": 2},
            "unknown parallelism_config key 'dp_replicate_size' (did you mean 'parallelism_config_dp_replicate_size'?)",
        ),
        ({"parallelism_config_cp_size": 2}, "parallelism_config_cp_size=2 is not supported by fsdp_nb"),
        ({"parallelism_config_dp_shard_size": 0}, "parallelism_config_dp_shard_size: dp_shard_size=0 is not valid"),
        ({"parallelism_config_tp_size": 2}, "parallelism_config_tp_size: tp_size=2 is not valid with fsdp_version=1"),
        ([2, 2], "parallelism_config must be a mapping of parallelism_config_* keys, got list"),
    ],
)
def test_yaml_section_errors_are_one_line_naming_the_key(section, problem):
    file = {"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 1}, "parallelism_config": section}
    assert one_line_error(FSDPConfig.from_accelerate, file).startswith(problem)


def test_environment_is_read_under_accelerates_switch_only():
    launcher = {  # what `accelerate launch` sets for a file with a parallelism_config section
        "FSDP_VERSION": "2",
        "ACCELERATE_USE_PARALLELISM_CONFIG": "true",
        "PARALLELISM_CONFIG_DP_REPLICATE_SIZE": "2",
        "PARALLELISM_CONFIG_DP_SHARD_SIZE": "2",
        "PARALLELISM_CONFIG_TP_SIZE": "1",
        "PARALLELISM_CONFIG_CP_SIZE": "1",
        "PARALLELISM_CONFIG_CP_BACKEND": "torch",
        "PARALLELISM_CONFIG_SP_SIZE": "1",
        "PARALLELISM_CONFIG_SP_BACKEND": "deepspeed",
    }
    c = FSDPConfig.from_env(launcher)
    assert (c.dp_replicate_size, c.dp_shard_size, c.tp_size) == (2, 2, 1)
    assert FSDPConfig.from_env(launcher | {"ACCELERATE_USE_PARALLELISM_CONFIG": "false"}) == FSDPConfig()
    assert FSDPConfig.from_env({k: v for k, v in launcher.items() if k != "ACCELERATE_USE_PARALLELISM_CONFIG"}) == (
        FSDPConfig()
    )
    bad = one_line_error(FSDPConfig.from_env, launcher | {"PARALLELISM_CONFIG_DP_SHARD_SIZE": "two"})
    assert bad == "PARALLELISM_CONFIG_DP_SHARD_SIZE='two' is not valid; accepted: an int >= 1"
    zero = one_line_error(FSDPConfig.from_env, launcher | {"PARALLELISM_CONFIG_TP_SIZE": "0"})
    assert zero.startswith("PARALLELISM_CONFIG_TP_SIZE: tp_size=0 is not valid; accepted: an int >= 1")
    assert "is not supported" in one_line_error(FSDPConfig.from_env, launcher | {"PARALLELISM_CONFIG_SP_SIZE": "2"})


def test_hybrid_strategy_notes_name_the_key_to_add():
    with pytest.warns(FutureWarning) as record:
        FSDPConfig(sharding_strategy="HYBRID_SHARD")
    assert "add `parallelism_config_dp_replicate_size: R` under `parallelism_config:`" in str(record[0].message)
    with pytest.warns(FutureWarning) as record:  # the size is given: no advice to give it
        c = FSDPConfig(sharding_strategy="HYBRID_SHARD", dp_replicate_size=2)
    assert "parallelism_config" not in str(record[0].message) and c.reshard_after_forward is True
    _, notes = convert_to_fsdp2({"fsdp_config": {"fsdp_sharding_strategy": "HYBRID_SHARD_ZERO2"}})
    assert notes[0].startswith("fsdp_sharding_strategy: HYBRID_SHARD_ZERO2 -> fsdp_reshard_after_forward: false")
    assert "2-D device mesh" in notes[0] and "`parallelism_config_dp_replicate_size: R`" in notes[0]


def test_an_int_reshard_divides_the_shard_group():
    plan_mesh(FSDPConfig(reshard_after_forward=2, dp_replicate_size=2), 8)  # shard groups of 4
    message = one_line_error(plan_mesh, FSDPConfig(reshard_after_forward=4, dp_replicate_size=2), 8)
    assert message == (
        "reshard_after_forward=4 is not smaller than the shard group size 4 (dp_shard_size); "
        "use True, False or a divisor of 4 in [2]"
    )


# ---- pure: refusals, one line each, saying what would work ---------------------------------

REFUSALS = {
    "sizes do not divide": (
        lambda: FSDPConfig(dp_replicate_size=3).validate_for_world(4),
        "dp_replicate_size=3 × tp_size=1 = 3 does not divide 4; use sizes whose product is 4, "
        "such as dp_replicate_size=2, dp_shard_size=2",
    ),
    "sizes multiply to less": (
        lambda: FSDPConfig(dp_shard_size=2).validate_for_world(4),
        "dp_replicate_size=1 × dp_shard_size=2 × tp_size=1 = 2, not the world size 4; use dp_replicate_size=2 "
        "or dp_shard_size=4 (or None: world / (dp_replicate_size × tp_size))",
    ),
    "sizes multiply to more": (
        lambda: FSDPConfig(dp_replicate_size=2, dp_shard_size=4).validate_for_world(4),
        "dp_replicate_size=2 × dp_shard_size=4 × tp_size=1 = 8, not the world size 4; use dp_shard_size=2",
    ),
    "replicas without shards": (
        lambda: FSDPConfig(dp_replicate_size=4).validate_for_world(4),
        "dp_shard_size=1 with dp_replicate_size=4 shards nothing",
    ),
    "tp with fsdp1": (
        lambda: FSDPConfig(fsdp_version=1, tp_size=2),
        "tp_size=2 is not valid with fsdp_version=1 (FSDP1 does not compose with tensor parallelism); "
        "accepted: tp_size=1, or fsdp_version=2",
    ),
    "fsdp1 replicas without a hybrid strategy": (
        lambda: FSDPConfig(fsdp_version=1, dp_replicate_size=2),
        "dp_replicate_size=2 with fsdp_version=1 needs sharding_strategy='HYBRID_SHARD' or 'HYBRID_SHARD_ZERO2'",
    ),
    "fsdp1 hybrid over part of the nodes": (
        lambda: FSDPConfig(fsdp_version=1, sharding_strategy="HYBRID_SHARD").validate_for_world(6, 4),
        "sharding_strategy='HYBRID_SHARD' replicates across nodes, but world size 6 is not a whole number of "
        "nodes of LOCAL_WORLD_SIZE=4; set dp_replicate_size",
    ),
    "mesh disagrees with a size": (
        lambda: plan_mesh(FSDPConfig(dp_shard_size=4), 4, mesh_shape=(2, 2)),
        "mesh= has shape (2, 2) (dp_replicate 2 × dp_shard 2) but the config sets dp_shard_size=4; leave the "
        "sizes at their defaults (the mesh wins) or make them dp_replicate_size=2, dp_shard_size=2",
    ),
    "1-D mesh against replicas": (
        lambda: plan_mesh(FSDPConfig(dp_replicate_size=2), 4, mesh_shape=(4,)),
        "mesh= has shape (4,) (dp_replicate 1 × dp_shard 4) but the config sets dp_replicate_size=2",
    ),
    "fsdp1 hybrid on a 1-D mesh": (
        lambda: plan_mesh(FSDPConfig(fsdp_version=1, sharding_strategy="HYBRID_SHARD"), 4, mesh_shape=(4,)),
        "sharding_strategy='HYBRID_SHARD' needs a 2-D (replicate, shard) mesh=, got shape (4,)",
    ),
    "fsdp1 full shard on a 2-D mesh": (
        lambda: plan_mesh(FSDPConfig(fsdp_version=1), 4, mesh_shape=(2, 2)),
        "mesh= is 2-D (2, 2), which FSDP1 shards over only with a hybrid strategy",
    ),
    "3-D mesh": (
        lambda: plan_mesh(FSDPConfig(), 8, mesh_shape=(2, 2, 2)),
        "mesh= has 3 dimensions (2, 2, 2); accepted: a 1-D mesh (FSDP) or a 2-D (replicate, shard) mesh (HSDP)",
    ),
    "bad size": (
        lambda: FSDPConfig(dp_replicate_size=0),
        "dp_replicate_size=0 is not valid; accepted: an int >= 1",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_one_line_and_say_what_works(case):
    fn, expected = REFUSALS[case]
    assert one_line_error(fn).startswith(expected)


# ---- 4 ranks ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks(session4):
    """The shared 4-rank session, with this module's setup run on it."""
    from conftest import ready

    run(ready(session4), RANK_SETUP)
    return session4


def run(session, *sources: str):
    return session.run("\n".join(textwrap.dedent(s) for s in sources), output=Silent()).raise_errors()


RANK_SETUP = f"""
import warnings
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy, fully_shard
from fsdp_nb.config import FSDPConfig
from fsdp_nb.data import ByteBlocks, stdlib_corpus
from fsdp_nb.models import GPT, GPTConfig, Layer
from fsdp_nb.optim import clip_sharded_grads
from fsdp_nb.sharding import build_on_rank0, shard
from fsdp_nb.train import Trainer, TrainConfig
warnings.filterwarnings("ignore")

def quiet(**kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FSDPConfig(**kwargs)

def refusal(fn):
    try:
        fn()
    except Exception as e:
        return type(e).__name__, str(e)

def train_run(train, fsdp, mesh=None):
    data, config = ByteBlocks(stdlib_corpus({CORPUS_BYTES}), 16), quiet(**fsdp)
    model = build_on_rank0(lambda: GPT(GPTConfig.debug(), seed=0), config)  # empty away from rank 0 when loading
    trainer = Trainer(model, data, TrainConfig(**train), fsdp=config, mesh=mesh)
    history = trainer.fit()
    full = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    rows = [trainer.train_batches.local_indices(s) for s in range(train["steps"])]
    return history, {{k: v.detach().clone() for k, v in full.items()}}, rows
"""


def test_fsdp2_hsdp_places_parameters_as_torch_does(ranks):
    run(
        ranks,
        """
    torch.manual_seed(0); ours = shard(Layer(), FSDPConfig(dp_replicate_size=2))
    torch.manual_seed(0); theirs = Layer()
    fully_shard(theirs, mesh=init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard")))
    mesh = next(ours.parameters()).device_mesh
    layout = (tuple(mesh.shape), mesh.mesh_dim_names)
    placements = {n: tuple(map(str, p.placements)) for n, p in ours.named_parameters()}  # text: they do not pickle
    local = {n: p.to_local().clone() for n, p in ours.named_parameters()}
    torch_local = {n: p.to_local().clone() for n, p in theirs.named_parameters()}
    local_bytes = sum(t.numel() * t.element_size() for t in local.values())
    """,
    )
    from torch.distributed.tensor import Replicate, Shard

    assert ranks.eval("layout") == [((2, 2), ("dp_replicate", "dp_shard"))] * 4
    torch.manual_seed(0)
    full = dict(Layer().named_parameters())  # the one-process parameters both started from
    for rank, (placements, local, torch_local) in enumerate(
        zip(ranks.eval("placements"), ranks.eval("local"), ranks.eval("torch_local"))
    ):
        s = rank % 2  # rank = r·S + s: ranks 0 and 2 hold rows of shard 0, ranks 1 and 3 of shard 1
        assert set(placements.values()) == {(str(Replicate()), str(Shard(0)))}
        for name, value in full.items():
            torch.testing.assert_close(local[name], torch_local[name], rtol=0, atol=0)
            torch.testing.assert_close(local[name], value.detach().chunk(2)[s], rtol=0, atol=0, msg=name)
    # 93 fp32 elements; a shard group splits each tensor's rows (l3's 3 rows: 2 on s = 0, 1 on s = 1)
    assert ranks.eval("local_bytes") == [50 * 4, 43 * 4, 50 * 4, 43 * 4]


def test_fsdp1_hybrid_shard_builds_the_flat_parameter_torch_builds(ranks):
    run(
        ranks,
        """
    cfg = FSDPConfig(fsdp_version=1, sharding_strategy="HYBRID_SHARD", dp_replicate_size=2, use_orig_params=False)
    torch.manual_seed(0); ours = shard(Layer(), cfg)
    torch.manual_seed(0)
    theirs = FSDP(Layer(), device_id=torch.device("cpu"), sharding_strategy=ShardingStrategy.HYBRID_SHARD,
                  device_mesh=init_device_mesh("cpu", (2, 2)), use_orig_params=False)
    flat = [p.detach().clone() for p in ours.parameters()]  # FlatParameters: one unit, the root
    torch_flat = [p.detach().clone() for p in theirs.parameters()]
    group_sizes = (ours.process_group.size(), ours.sharding_strategy.name)
    with warnings.catch_warnings(record=True) as caught:  # no dp_replicate_size on one machine: R = 1
        warnings.simplefilter("always")
        cfg = FSDPConfig(fsdp_version=1, sharding_strategy="HYBRID_SHARD", use_orig_params=False)
        one_machine = shard(Layer(), cfg)
    said = [str(w.message) for w in caught if "replicates across nodes" in str(w.message)]
    ran = (one_machine.sharding_strategy.name, [p.numel() for p in one_machine.parameters()])
    """,
    )
    flats, torch_flats = ranks.eval("flat"), ranks.eval("torch_flat")
    for rank in range(4):
        assert [t.numel() for t in flats[rank]] == [47]  # 93 elements padded to 94, split in 2: one shard group
        torch.testing.assert_close(flats[rank], torch_flats[rank], rtol=0, atol=0)
        torch.testing.assert_close(flats[rank], flats[rank % 2], rtol=0, atol=0)  # ranks 0 and 2 are replicas
    assert ranks.eval("group_sizes") == [(2, "HYBRID_SHARD")] * 4
    assert ranks.eval("ran") == [("FULL_SHARD", [24])] * 4  # 93 padded to 96, split in 4
    for said in ranks.eval("said"):
        assert len(said) == 1 and "it runs as FULL_SHARD" in said[0] and "dp_replicate_size" in said[0]


def test_clipping_on_the_2d_mesh_takes_the_one_process_norm(ranks):
    run(
        ranks,
        """
    from torch.distributed.tensor import DTensor
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))  # (B, d_in), the same on every rank
    def sharded_grads():
        torch.manual_seed(0); model = shard(Layer(), FSDPConfig(dp_replicate_size=2))
        model(x[2 * rank : 2 * rank + 2]).pow(2).mean().backward()  # (2, d_in): this rank's rows
        return model, [p.grad for p in model.parameters()]
    model, grads = sharded_grads()
    through_dtensor = float(torch.nn.utils.get_total_norm(grads).full_tensor())
    real_all_reduce, calls = torch.distributed.all_reduce, []
    torch.distributed.all_reduce = lambda *a, **k: calls.append(k) or real_all_reduce(*a, **k)
    try:
        norm = clip_sharded_grads(grads, max_norm=0.1)
    finally:
        torch.distributed.all_reduce = real_all_reduce
    collectives = len(calls)
    clipped = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    """,
    )
    torch.manual_seed(0)
    ref = Layer()
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    ref(x).pow(2).mean().backward()
    ref_norm = float(torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]))
    assert ranks.eval("collectives") == [1] * 4  # one scalar all-reduce, none of DTensor's
    for norm, through_dtensor in zip(ranks.eval("norm"), ranks.eval("through_dtensor")):
        assert norm == pytest.approx(ref_norm, rel=1e-5) and through_dtensor == pytest.approx(ref_norm, rel=1e-5)
    scale = 0.1 / (ref_norm + 1e-6)
    for clipped in ranks.eval("clipped"):
        for name, p in ref.named_parameters():
            torch.testing.assert_close(clipped[name], p.grad * scale, **TOL, msg=name)


def reference() -> tuple[list[dict], dict]:
    """One process, the whole global batch, no FSDP."""
    data = ByteBlocks(stdlib_corpus(CORPUS_BYTES), 16)
    trainer = Trainer(GPT(GPTConfig.debug(), seed=0), data, TrainConfig(**TRAIN))
    history = trainer.fit()
    return history, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


HSDP = {
    "fsdp1-hybrid": dict(fsdp_version=1, sharding_strategy="HYBRID_SHARD", dp_replicate_size=2),
    "fsdp1-hybrid-zero2-flat": dict(
        fsdp_version=1, sharding_strategy="HYBRID_SHARD_ZERO2", dp_replicate_size=2, use_orig_params=False
    ),
    "fsdp2-hsdp": dict(fsdp_version=2, dp_replicate_size=2),
    "fsdp2-from-hybrid-strategy": dict(fsdp_version=2, sharding_strategy="HYBRID_SHARD", dp_replicate_size=2),
    # rank 0's weights scattered over a 2-D mesh, and units recomputed in backward
    "fsdp1-hybrid-loading": dict(
        fsdp_version=1, sharding_strategy="HYBRID_SHARD", dp_replicate_size=2, cpu_ram_efficient_loading=True
    ),
    "fsdp2-hsdp-loading-checkpointing": dict(
        fsdp_version=2, dp_replicate_size=2, cpu_ram_efficient_loading=True, activation_checkpointing=True
    ),
}


@pytest.mark.timeout(120)
def test_trainer_with_hsdp_matches_one_process(ranks):
    for name, fsdp in HSDP.items():
        fsdp = {**fsdp, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}
        run(ranks, f"results_{name.replace('-', '_')} = train_run({TRAIN!r}, {fsdp!r})")
    ref_history, ref_params = reference()
    full_bytes = GPT(GPTConfig.debug()).num_params() * 4
    for name in HSDP:
        for history, params, _ in ranks.eval(f"results_{name.replace('-', '_')}"):
            assert history[0]["param_bytes"] == full_bytes / 2, name  # split in 2 (S), not in 4: rows replicate
            for key in ("loss", "grad_norm"):  # grad_norm: before clipping to 0.5, over the whole model
                torch.testing.assert_close(
                    torch.tensor([h[key] for h in history]), torch.tensor([h[key] for h in ref_history]), **TOL
                )
            assert sorted(params) == sorted(ref_params)
            for key, value in ref_params.items():
                torch.testing.assert_close(params[key], value, **TOL, msg=f"{name}: {key}")
    # every one of the 4 ranks is data parallel: 2 rows each, together the global batch in rank order
    rows = [result[2] for result in ranks.eval("results_fsdp2_hsdp")]
    one_process = ShardedBatches(ByteBlocks(stdlib_corpus(CORPUS_BYTES), 16), global_batch_size=8)
    for step in range(TRAIN["steps"]):
        per_rank = [r[step] for r in rows]
        assert [len(r) for r in per_rank] == [2] * 4
        assert sum(per_rank, []) == one_process.global_indices(step)


@pytest.mark.timeout(60)
def test_an_explicit_mesh_wins_and_a_contradiction_is_one_line_on_every_rank(ranks):
    run(
        ranks,
        """
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    placed = [tuple(map(str, p.placements)) for p in shard(Layer(), FSDPConfig(), mesh=mesh).parameters()]
    contradiction = refusal(lambda: shard(Layer(), FSDPConfig(dp_shard_size=4), mesh=mesh))
    bad_sizes = refusal(lambda: shard(Layer(), FSDPConfig(dp_replicate_size=3)))
    tp = refusal(lambda: shard(Layer(), FSDPConfig(tp_size=2), mesh=mesh))  # TP itself: tests/test_tp.py
    """,
    )
    from torch.distributed.tensor import Replicate, Shard

    assert all(set(p) == {(str(Replicate()), str(Shard(0)))} for p in ranks.eval("placed"))
    for name, kind, start in (
        ("contradiction", "ValueError", "mesh= has shape (2, 2) (dp_replicate 2 × dp_shard 2) but the config sets"),
        ("bad_sizes", "ValueError", "dp_replicate_size=3 × tp_size=1 = 3 does not divide 4"),
        ("tp", "ValueError", "mesh= with tp_size=2: fsdp_nb builds the (dp, tp) mesh itself from the sizes; leave"),
    ):
        for got_kind, message in ranks.eval(name):
            assert got_kind == kind and message.startswith(start) and "\n" not in message, message
