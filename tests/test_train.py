"""Trainer: FSDP1 and FSDP2 on 2 ranks match one process on the full batch.

The reference runs in the pytest process (no process group, the whole global
batch); the sharded runs happen on the shared session, and under torchrun for
the command line and for an uneven world size of 3.
"""

import json
import textwrap
from functools import cache

import pytest
import torch
from snippets import PATCH_REDUCE_SCATTER

from fsdp_nb.data import ByteBlocks, stdlib_corpus
from fsdp_nb.models import GPT, GPTConfig
from fsdp_nb.runfile import load_run_file
from fsdp_nb.session.output import Silent
from fsdp_nb.train import TrainConfig, Trainer, lr_at

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32; what the brief promises
TRAIN = dict(steps=10, global_batch_size=6, lr=1e-3, weight_decay=0.1, warmup_steps=2, clip_norm=0.5, log_interval=10)
CORPUS_BYTES = 40_000

RANK_SETUP = f"""
import warnings
warnings.filterwarnings("ignore")
from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
from fsdp_nb.config import FSDPConfig
from fsdp_nb.data import ByteBlocks, stdlib_corpus
from fsdp_nb.models import GPT, GPTConfig
from fsdp_nb.train import Trainer, TrainConfig

def train_run(train, fsdp, name=None):
    data = ByteBlocks(stdlib_corpus({CORPUS_BYTES}), 16)
    trainer = Trainer(GPT(GPTConfig.debug(), seed=0), data, TrainConfig(**train), fsdp=FSDPConfig(**fsdp), name=name)
    history = trainer.fit()
    full = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    return history, {{k: v.detach().clone() for k, v in full.items()}}
"""


def run(session, *sources: str):
    return session.run("\n".join(textwrap.dedent(s) for s in sources), output=Silent()).raise_errors()


@cache
def reference(**train) -> tuple[list[dict], dict]:
    """One process, whole global batch, no FSDP."""
    data = ByteBlocks(stdlib_corpus(CORPUS_BYTES), 16)
    trainer = Trainer(GPT(GPTConfig.debug(), seed=0), data, TrainConfig(**train))
    history = trainer.fit()
    return history, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_same_run(history, params, ref_history, ref_params):
    torch.testing.assert_close(
        torch.tensor([h["loss"] for h in history]), torch.tensor([h["loss"] for h in ref_history]), **TOL
    )
    torch.testing.assert_close(
        torch.tensor([h["grad_norm"] for h in history]), torch.tensor([h["grad_norm"] for h in ref_history]), **TOL
    )
    assert sorted(params) == sorted(ref_params)
    for name, value in ref_params.items():
        torch.testing.assert_close(params[name], value, **TOL, msg=name)


# ---- pure ------------------------------------------------------------------------


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(steps=10, lr=1.0, min_lr=0.1, warmup_steps=2)
    lrs = [lr_at(s, cfg) for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert lrs[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert lr_at(5, TrainConfig(steps=10, lr=1.0, schedule="constant")) == 1.0


def test_train_config_errors_name_the_field():
    with pytest.raises(ValueError, match="grad_accum_steps=0"):
        TrainConfig(grad_accum_steps=0)
    with pytest.raises(ValueError, match="schedule='linear'"):
        TrainConfig(schedule="linear")


def test_single_process_training_learns():
    history, _ = reference(**{**TRAIN, "lr": 1e-2})
    assert history[-1]["loss"] < history[0]["loss"] - 1.0
    assert history[0]["param_bytes"] == GPT(GPTConfig.debug()).num_params() * 4


def test_run_file_sections(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: {size: debug, n_layer: 3}\ntrain: {steps: 4}\n"
        "fsdp: {fsdp_version: 1, auto_wrap_policy: TRANSFORMER_BASED_WRAP}\n"
    )
    run_spec = load_run_file(str(path))
    assert run_spec["model"].n_layer == 3 and run_spec["model"].n_embd == 32
    assert run_spec["train"].steps == 4 and run_spec["fsdp"].fsdp_version == 1
    from fsdp_nb.cli import main

    assert main(["train", "--config", str(path)]) == 2  # an fsdp section without torchrun: one clear line
    assert "needs several ranks" in capsys.readouterr().err
    path.write_text("optimiser: {lr: 1}\n")
    with pytest.raises(ValueError, match="unknown sections \\['optimiser'\\]"):
        load_run_file(str(path))


# ---- parity on the 2-rank session ------------------------------------------------------

VARIANTS = {
    "fsdp1": dict(fsdp_version=1, use_orig_params=True),
    "fsdp1-flat": dict(fsdp_version=1, use_orig_params=False),
    "fsdp2": dict(fsdp_version=2),
    "fsdp2-keep-prefetch": dict(fsdp_version=2, reshard_after_forward=False, forward_prefetch=True),
    "fsdp1-checkpointing": dict(fsdp_version=1, activation_checkpointing=True),
    "fsdp2-checkpointing-offload": dict(fsdp_version=2, activation_checkpointing=True, cpu_offload=True),
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_with_one_process(session, variant):
    fsdp = {**VARIANTS[variant], "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}
    run(session, RANK_SETUP, f"history, params = train_run({TRAIN!r}, {fsdp!r})")
    ref_history, ref_params = reference(**TRAIN)
    for history, params in zip(session.eval("history"), session.eval("params")):
        assert_same_run(history, params, ref_history, ref_params)


def test_accumulating_two_half_batches_equals_the_full_batch():
    full = {**TRAIN, "global_batch_size": 8, "steps": 4}
    ref_history, ref_params = reference(**full)
    history, params = reference(**full, grad_accum_steps=2)
    assert_same_run(history, params, ref_history, ref_params)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("version", [1, 2])
def test_gradient_accumulation_parity_and_one_reduction_per_step(session, version):
    train = {**TRAIN, "global_batch_size": 8, "grad_accum_steps": 2, "steps": 4}
    fsdp = dict(fsdp_version=version, auto_wrap_policy="TRANSFORMER_BASED_WRAP")
    run(
        session,
        RANK_SETUP,
        PATCH_REDUCE_SCATTER,
        f"""
    reductions = []
    on_reduce_scatter = lambda input: reductions.append(1)
    patch_reduce_scatter()
    try:
        history, params = train_run({train!r}, {fsdp!r})
    finally:
        unpatch_reduce_scatter()
    """,
    )
    ref_history, ref_params = reference(**train)
    history, params = session.eval("history")[0], session.eval("params")[0]
    assert_same_run(history, params, ref_history, ref_params)
    # 3 units (2 blocks + root), reduced once per step: the first micro-step skipped it
    assert session.eval("len(reductions)") == [3 * train["steps"]] * 2


@pytest.mark.timeout(60)
def test_memory_is_sharded(session):
    fsdp = dict(fsdp_version=2, auto_wrap_policy="TRANSFORMER_BASED_WRAP")
    run(session, RANK_SETUP, f"history, params = train_run({ {**TRAIN, 'steps': 1}!r}, {fsdp!r})")
    full = GPT(GPTConfig.debug()).num_params() * 4
    for record in session.eval("history[-1]"):
        # dim-0 chunks of each parameter: half of it, plus at most a row of padding per tensor
        assert record["param_bytes"] == full / 2 and record["padding_bytes"] == 0  # even sizes: no padding
        assert record["grad_bytes"] == record["param_bytes"]
        # AdamW: exp_avg and exp_avg_sq like the shards, plus one scalar `step` per parameter
        assert 0 < record["optim_bytes"] - 2 * record["param_bytes"] <= 8 * 28


@pytest.mark.timeout(60)
def test_progress_and_metrics_reach_the_notebook_from_rank_0(session, recorder):
    train = {**TRAIN, "steps": 4, "log_interval": 2}
    source = RANK_SETUP + f"history, params = train_run({train!r}, dict(fsdp_version=2), name='fsdp2 run')"
    result = session.run(source, output=recorder).raise_errors()
    progress = [(r, p["step"], p["total"]) for r, kind, p in result.events if kind == "progress"]
    metrics = [(r, p) for r, kind, p in result.events if kind == "metrics"]
    assert progress == [(0, 2, 4), (0, 4, 4)]
    assert [r for r, _ in metrics] == [0, 0]
    assert metrics[-1][1]["loss"] == session.eval("history[-1]['loss']")[0]
    assert {"tokens_per_s", "mem_mb", "lr", "grad_norm"} <= set(metrics[-1][1])
    assert metrics[-1][1]["run"] == "fsdp2 run"  # the live plot's curve label
    assert "loss" not in recorder.text(0) + recorder.text(1)  # events replace the printed line


def test_batch_smaller_than_world_size_is_refused(session):
    run(
        session,
        RANK_SETUP,
        """
    try:
        train_run(dict(global_batch_size=1), dict(fsdp_version=2))
        message = None
    except ValueError as e:
        message = str(e)
    """,
    )
    assert "global_batch_size=1 is smaller than world_size=2" in session.eval("message")[0]


# ---- torchrun --------------------------------------------------------------------------


RUN_FILE = f"""
model: {{size: debug}}
data: {{source: stdlib, max_bytes: {CORPUS_BYTES}, val_fraction: 0.1}}
train: {{steps: 6, global_batch_size: 6, lr: 0.001, clip_norm: 0.5, eval_interval: 3, log_interval: 3}}
fsdp: {{fsdp_version: 2, auto_wrap_policy: TRANSFORMER_BASED_WRAP}}
"""


@pytest.mark.timeout(120)
def test_cli_under_torchrun_matches_the_session(session, tmp_path, torchrun):
    (tmp_path / "run.yaml").write_text(RUN_FILE)
    done = torchrun(
        2,
        [
            "-m",
            "fsdp_nb.cli",
            "train",
            "--config",
            str(tmp_path / "run.yaml"),
            "--history",
            str(tmp_path / "history.json"),
        ],
        timeout=110,
    )
    assert "[##########..........] step 3/6 loss" in done.stdout  # a plain progress bar in a terminal
    assert (
        "[####################] step 6/6 loss" in done.stdout and done.stdout.count("val_loss") == 2
    )  # rank 0 prints, once
    from_torchrun = json.loads((tmp_path / "history.json").read_text())
    run(
        session,
        RANK_SETUP,
        f"""
    from fsdp_nb.runfile import load_run_file
    spec = load_run_file({str(tmp_path / "run.yaml")!r})
    blocks = ByteBlocks(stdlib_corpus({CORPUS_BYTES}), 16)
    train_data, val_data = blocks.split(0.1)
    trainer = Trainer(GPT(spec["model"], seed=0), train_data, spec["train"], fsdp=spec["fsdp"], val_data=val_data)
    in_session = trainer.fit()
    """,
    )
    in_session = session.eval("in_session")[0]
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(
            torch.tensor([h[key] for h in from_torchrun]), torch.tensor([h[key] for h in in_session]), **TOL
        )
    val = [(h["step"], h["val_loss"]) for h in from_torchrun if "val_loss" in h]
    assert [s for s, _ in val] == [3, 6]
    torch.testing.assert_close(
        torch.tensor([v for _, v in val]), torch.tensor([h["val_loss"] for h in in_session if "val_loss" in h]), **TOL
    )


WORLD3_SCRIPT = (
    RANK_SETUP
    + """
import gc, sys, torch, torch.distributed as dist
from fsdp_nb.train import init_distributed
rank, world_size = init_distributed()
results = {name: train_run(TRAIN, {"auto_wrap_policy": "TRANSFORMER_BASED_WRAP", **fsdp})
           for name, fsdp in VARIANTS.items()}
if rank == 0:
    torch.save(results, sys.argv[1])
del results
gc.collect()  # free FSDP state before the process group goes
dist.barrier()
dist.destroy_process_group()
"""
)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_world_size_3_uneven_shards_match_one_process(tmp_path, torchrun):
    variants = {k: VARIANTS[k] for k in ("fsdp1", "fsdp1-flat", "fsdp2")}
    script = tmp_path / "world3.py"
    script.write_text(f"TRAIN = {TRAIN!r}\nVARIANTS = {variants!r}\n" + textwrap.dedent(WORLD3_SCRIPT))
    torchrun(3, [str(script), str(tmp_path / "out.pt")], timeout=140)
    results = torch.load(tmp_path / "out.pt")
    assert sorted(results) == sorted(variants)
    ref_history, ref_params = reference(**TRAIN)
    for history, params in results.values():
        assert_same_run(history, params, ref_history, ref_params)
