"""Every pair of FSDP options trains like one process, or is refused up front; none hangs.

The options: version x resharding (FSDP1 `sharding_strategy`, FSDP2 `reshard_after_forward`)
x activation checkpointing x `cpu_ram_efficient_loading` x mixed precision x CPU offload,
plus `use_orig_params` for FSDP1. A covering set (`pairwise.all_pairs`) holds every pair
of values at least once, and so every combination of activation checkpointing with
RAM-efficient loading. The model is the GPT: a tied embedding/head and a non-persistent
buffer (positions), the two things RAM-efficient loading gets wrong most easily.

Each combination runs on its own 2-rank session with a 10 s process-group timeout and a
45 s wall limit, so a hang fails that combination within the limit instead of the suite.

Tolerances:
- fp32: relative 1e-5 on the losses, as every parity test here;
- bf16 (`mixed_precision="bf16"`: bf16 compute, fp32 reduction, fp32 loss) is compared with
  the same fp32 reference, at 2e-3 relative: half of bf16's unit roundoff (2^-8), less than
  the rounding of a single bf16 number. Measured here, bf16 runs differ from fp32 by 4e-5
  at the first step, growing to 2e-4 at the third: a tenfold margin, while a run on wrong
  weights (a garbage buffer, a missed broadcast) is off by far more, or NaN.
"""

import textwrap
from functools import cache

import pytest
import torch
from pairwise import all_pairs, uncovered

from fsdp_nb.data import ByteBlocks, stdlib_corpus
from fsdp_nb.models import GPT, GPTConfig
from fsdp_nb.session.output import Silent
from fsdp_nb.train import TrainConfig, Trainer

TRAIN = dict(steps=3, global_batch_size=4, lr=3e-3, log_interval=0)
CORPUS_BYTES = 20_000
FP32_RTOL, BF16_RTOL = 1e-5, 2e-3

OPTIONS = {
    1: dict(
        sharding_strategy=["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"],
        activation_checkpointing=[False, True],
        cpu_ram_efficient_loading=[False, True],
        mixed_precision=[None, "bf16"],
        cpu_offload=[False, True],
        use_orig_params=[False, True],
    ),
    2: dict(
        reshard_after_forward=[True, False],
        activation_checkpointing=[False, True],
        cpu_ram_efficient_loading=[False, True],
        mixed_precision=[None, "bf16"],
        cpu_offload=[False, True],
    ),
}


def combinations() -> list[dict]:
    out = []
    for version, factors in OPTIONS.items():
        defaults = {name: values[0] for name, values in factors.items()}
        out += [{"fsdp_version": version, **row} for row in all_pairs(factors, [defaults])]
    return out


COMBINATIONS = combinations()


ABBREVIATIONS = {
    "fsdp_version": "v",
    "sharding_strategy": "",
    "reshard_after_forward": "reshard",
    "activation_checkpointing": "ac",
    "cpu_ram_efficient_loading": "ram",
    "mixed_precision": "",
    "cpu_offload": "offload",
    "use_orig_params": "orig",
}


def label(combo: dict) -> str:
    """`v1-FULL_SHARD-ac-ram-bf16-offload-orig`: the options that are on, in short."""
    parts = []
    for key, value in combo.items():
        short = ABBREVIATIONS[key]
        if isinstance(value, bool):
            parts += [short] if value else []
        elif value is not None:
            parts.append(f"{short}{value}")
    return "-".join(parts)


def test_the_set_covers_every_pair_and_every_checkpointing_loading_combination():
    for version, factors in OPTIONS.items():
        rows = [
            {k: v for k, v in c.items() if k != "fsdp_version"} for c in COMBINATIONS if c["fsdp_version"] == version
        ]
        assert uncovered(rows, factors) == set()
        assert {(r["activation_checkpointing"], r["cpu_ram_efficient_loading"]) for r in rows} == {
            (False, False), (False, True), (True, False), (True, True)
        }  # fmt: skip
    assert 12 <= len(COMBINATIONS) <= 20


def test_the_covering_check_can_fail():
    factors = {"a": [0, 1], "b": [0, 1]}
    assert uncovered([{"a": 0, "b": 0}, {"a": 1, "b": 1}], factors) == {(("a", 0), ("b", 1)), (("a", 1), ("b", 0))}


@cache
def reference_losses() -> list[float]:
    """One process, the whole global batch, fp32, no FSDP."""
    trainer = Trainer(GPT(GPTConfig.debug(), seed=0), ByteBlocks(stdlib_corpus(CORPUS_BYTES), 16), TrainConfig(**TRAIN))
    return [h["loss"] for h in trainer.fit()]


@pytest.fixture(scope="module")
def pairs_session():
    from fsdp_nb import Session

    s = Session(2, timeout=10)  # a hang becomes a collective timeout well inside the 45 s limit
    yield s
    s.close()


@pytest.fixture
def fresh(pairs_session):
    from fsdp_nb.session import State

    if pairs_session.state != State.READY:  # an earlier combination broke it or ran out of time
        pairs_session.close()
        pairs_session.start()
    return pairs_session


SETUP = """
import warnings
warnings.filterwarnings("ignore")
from fsdp_nb.config import FSDPConfig
from fsdp_nb.data import ByteBlocks, stdlib_corpus
from fsdp_nb.loading import build_on_rank0
from fsdp_nb.models import GPT, GPTConfig
from fsdp_nb.train import TrainConfig, Trainer
"""


@pytest.mark.timeout(45)
@pytest.mark.parametrize("combo", COMBINATIONS, ids=label)
def test_option_pair_trains_like_one_process(fresh, combo):
    cell = SETUP + textwrap.dedent(f"""
        config = FSDPConfig(auto_wrap_policy="TRANSFORMER_BASED_WRAP", **{combo!r})
        model = build_on_rank0(lambda: GPT(GPTConfig.debug(), seed=0), config)
        trainer = Trainer(model, ByteBlocks(stdlib_corpus({CORPUS_BYTES}), 16), TrainConfig(**{TRAIN!r}), fsdp=config)
        losses = [h["loss"] for h in trainer.fit()]
        buffers_ok = bool((trainer.model.pos.cpu() == torch.arange(GPTConfig.debug().block_size)).all())
    """)
    fresh.run(cell, output=Silent()).raise_errors()
    assert fresh.eval("buffers_ok") == [True, True]  # the non-persistent buffer came from rank 0
    losses = fresh.eval("losses")
    assert losses[0] == losses[1]  # the global-batch mean, on every rank
    rtol = BF16_RTOL if combo["mixed_precision"] else FP32_RTOL
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(reference_losses()), rtol=rtol, atol=0)
