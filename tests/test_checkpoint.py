"""Checkpoints on real ranks: exact resume, cross-version and resharding loads, async, a rank killed mid-save.

The shared 2-rank session does most of the work; one 3-rank session (module scope)
loads what 2 ranks saved, and saves what 2 ranks load. Every comparison is against
state gathered in full and compared key by key, so a swapped `exp_avg` and
`exp_avg_sq` (the two share shapes) could not pass.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from fsdp_nb import RankError, Session
from fsdp_nb.checkpoint import CheckpointError, load_checkpoint, merge_weights, save_checkpoint
from fsdp_nb.models import GPT, GPTConfig

# Rank-side helpers: a tiny GPT, deterministic batches per step, full state gathered by key.
HELPERS = """
import os, signal, torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict)
from fsdp_nb import FSDPConfig, shard, save_checkpoint, load_checkpoint, Trainer, TrainConfig
from fsdp_nb.models import GPT, GPTConfig
from fsdp_nb.data import ByteBlocks, stdlib_corpus

def build(version, uop=True, seed=1, **cfg):
    config = FSDPConfig(fsdp_version=version, use_orig_params=uop, auto_wrap_policy="TRANSFORMER_BASED_WRAP")
    model = shard(GPT(GPTConfig.debug(**cfg), seed=seed), config)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

def batch(step):  # the same global batch on every rank, split by rank
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, 256, (2 * world_size, 16), generator=g)
    return x[2 * rank: 2 * rank + 2]

def train(model, opt, steps, start=0):
    losses = []
    for step in range(start, start + steps):
        x = batch(step)
        loss = model(x, x)[1]
        loss.backward()
        opt.step()
        opt.zero_grad()
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(t.item() / world_size)
    return losses

def full(model, opt=None):  # everything, gathered, by key (cpu_offload=False: the safe path on CPU)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=False)
    out = {"model": {k: v.clone() for k, v in get_model_state_dict(model, options=opts).items()}}
    if opt is not None:
        osd = get_optimizer_state_dict(model, opt, options=opts)
        out["optim"] = {fqn: {k: v.clone() for k, v in s.items()} for fqn, s in osd["state"].items()}
    return out
"""


def run(session, *cells: str):
    for cell in cells:
        session.run(textwrap.dedent(cell), output=_quiet()).raise_errors()


def _quiet():
    from fsdp_nb.session.output import Silent

    return Silent()


def assert_same_state(a: dict, b: dict):
    assert sorted(a["model"]) == sorted(b["model"])
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)
    if "optim" in a or "optim" in b:
        assert sorted(a["optim"]) == sorted(b["optim"])
        for fqn, state in a["optim"].items():
            assert sorted(state) == sorted(b["optim"][fqn]) == ["exp_avg", "exp_avg_sq", "step"]
            for name in state:  # by key: a swap of exp_avg and exp_avg_sq fails here
                torch.testing.assert_close(state[name], b["optim"][fqn][name], rtol=0, atol=0, msg=f"{fqn}.{name}")


@pytest.fixture(scope="module")
def three_ranks():
    s = Session(3, timeout=60)
    s.run(HELPERS, output=_quiet()).raise_errors()
    yield s
    s.close()


CASES = [(1, "SHARDED_STATE_DICT"), (1, "FULL_STATE_DICT"), (2, "SHARDED_STATE_DICT"), (2, "FULL_STATE_DICT")]


@pytest.mark.timeout(240)
def test_resume_in_a_fresh_session_is_exact(session, tmp_path):
    """6 steps, save, a fresh session, load, 6 more: the same losses and parameters as 12 straight steps."""
    session.push(root=str(tmp_path), cases=CASES)
    run(
        session,
        HELPERS,
        """
    for version, kind in cases:
        model, opt = build(version)
        train(model, opt, 6)
        save_checkpoint(model, opt, f"{root}/v{version}-{kind}", state_dict_type=kind)
    data = ByteBlocks(stdlib_corpus(50_000), 16)
    cfg = TrainConfig(steps=12, global_batch_size=4, lr=3e-3, warmup_steps=2, log_interval=0)
    t = Trainer(GPT(GPTConfig.debug(), seed=2), data, cfg, fsdp=FSDPConfig(fsdp_version=2),
                checkpoint_dir=f"{root}/trainer", checkpoint_every=6)
    straight_losses = [r["loss"] for r in t.fit()]  # 12 uninterrupted steps, checkpoints at 6 and 12
    """,
    )
    straight = session.eval("straight_losses")[0]
    session.restart()  # a fresh session: nothing survives but the files
    session.push(root=str(tmp_path), cases=CASES)
    run(
        session,
        HELPERS,
        """
    results = {}
    for version, kind in cases:
        model, opt = build(version)
        load_checkpoint(model, opt, f"{root}/v{version}-{kind}")
        resumed = train(model, opt, 6, start=6), full(model, opt)
        model, opt = build(version)
        straight = train(model, opt, 12)[6:], full(model, opt)
        results[(version, kind)] = resumed, straight
    data = ByteBlocks(stdlib_corpus(50_000), 16)
    cfg = TrainConfig(steps=12, global_batch_size=4, lr=3e-3, warmup_steps=2, log_interval=0)
    resumed = Trainer(GPT(GPTConfig.debug(), seed=99), data, cfg, fsdp=FSDPConfig(fsdp_version=2),
                      resume_from=f"{root}/trainer/step-000006")
    first_step = len(resumed.history)
    resumed_losses = [r["loss"] for r in resumed.fit()]
    latest = Trainer(GPT(GPTConfig.debug(), seed=99), data, cfg, fsdp=FSDPConfig(fsdp_version=2),
                     resume_from=f"{root}/trainer")  # a directory of checkpoints: the latest, step 12
    latest_step = len(latest.history)
    """,
    )
    for case, ((losses, state), (ref_losses, ref_state)) in session.eval("results")[0].items():
        assert losses == pytest.approx(ref_losses, abs=1e-6, rel=0), case
        for key in ref_state["model"]:
            torch.testing.assert_close(state["model"][key], ref_state["model"][key], rtol=0, atol=1e-6, msg=key)
    assert session.eval("first_step") == [6, 6] and session.eval("latest_step") == [12, 12]
    assert session.eval("resumed_losses")[0] == pytest.approx(straight, abs=1e-6, rel=0)


@pytest.mark.timeout(240)
def test_cross_version_and_resharding_loads_are_bit_exact(session, three_ranks, tmp_path):
    """FSDP1 at 2 ranks -> FSDP2 and FSDP1 (use_orig_params=True) at 3, and FSDP2 at 3 -> FSDP1 at 2."""
    session.push(root=str(tmp_path))
    run(
        session,
        HELPERS,
        """
    model, opt = build(1, uop=False)
    train(model, opt, 3)
    save_checkpoint(model, opt, f"{root}/fsdp1-w2")
    saved_fsdp1 = full(model, opt)
    """,
    )
    saved_fsdp1 = session.eval("saved_fsdp1")[0]
    some = next(iter(saved_fsdp1["optim"].values()))
    assert not torch.equal(some["exp_avg"], some["exp_avg_sq"])  # else a swap could not be seen
    three_ranks.push(root=str(tmp_path))
    run(
        three_ranks,
        """
    loaded = {}
    for version, uop in ((2, True), (1, True)):
        model, opt = build(version, uop=uop, seed=7)  # other weights: everything must come from the file
        load_checkpoint(model, opt, f"{root}/fsdp1-w2")
        loaded[(version, uop)] = full(model, opt)
    model, opt = build(2)
    train(model, opt, 2)
    save_checkpoint(model, opt, f"{root}/fsdp2-w3")
    saved_fsdp2 = full(model, opt)
    """,
    )
    for case, state in three_ranks.eval("loaded")[0].items():
        assert_same_state(state, saved_fsdp1), case
    run(
        session,
        """
    model, opt = build(1, uop=False, seed=7)
    load_checkpoint(model, opt, f"{root}/fsdp2-w3")
    loaded_fsdp1 = full(model, opt)
    """,
    )
    assert_same_state(session.eval("loaded_fsdp1")[0], three_ranks.eval("saved_fsdp2")[0])


@pytest.mark.timeout(120)
def test_async_save_holds_the_state_of_the_moment_it_was_called(session, tmp_path):
    session.push(root=str(tmp_path))
    run(
        session,
        HELPERS,
        """
    results, loads = {}, {}
    for version in (1, 2):
        model, opt = build(version, n_embd=256, n_layer=4, block_size=64)  # big enough to take a while
        train(model, opt, 2)
        at_call = full(model, opt)
        handle = save_checkpoint(model, opt, f"{root}/async-v{version}", async_save=True)
        pending = []
        for step in range(2, 5):  # training goes on, on the default group, while the copy is written
            pending.append(not handle.done())
            train(model, opt, 1, start=step)
        assert handle.wait() is not None and handle.done()
        moved = not torch.equal(full(model)["model"]["wte.weight"], at_call["model"]["wte.weight"])
        fresh, fresh_opt = build(version, n_embd=256, n_layer=4, block_size=64, seed=5)
        load_checkpoint(fresh, fresh_opt, f"{root}/async-v{version}")
        loads[version] = full(fresh, fresh_opt), at_call
        results[version] = (pending, moved, repr(handle))
    """,
    )
    results, loads = session.eval("results")[0], session.eval("loads")[0]
    assert sorted(results) == sorted(loads) == [1, 2]
    for version in (1, 2):
        pending, moved, shown = results[version]
        assert pending[0] and moved, version  # steps really ran while the save was pending, and changed the weights
        assert "saved in" in shown
        loaded, at_call = loads[version]
        assert_same_state(loaded, at_call)


@pytest.mark.timeout(180)
def test_a_rank_killed_mid_save_leaves_the_older_checkpoint_whole(session, tmp_path):
    session.push(root=str(tmp_path))
    run(
        session,
        HELPERS,
        """
    model, opt = build(2)
    train(model, opt, 2)
    save_checkpoint(model, opt, f"{root}/old")
    old_state = full(model, opt)
    train(model, opt, 2, start=2)
    """,
    )
    old_state = session.eval("old_state")[0]
    with pytest.raises(RankError, match="rank 1 exited with signal 9"):
        session.run(
            textwrap.dedent("""
        from torch.distributed.checkpoint import FileSystemWriter
        write = FileSystemWriter.write_data
        def dying(self, plan, planner):
            if rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)  # in the middle of the save: after planning, before writing
            return write(self, plan, planner)
        FileSystemWriter.write_data = dying
        save_checkpoint(model, opt, f"{root}/new")
        """),
            output=_quiet(),
        ).raise_errors()
    assert session.state.value == "broken"
    session.restart()
    assert session.eval("rank") == [0, 1]
    with pytest.raises(CheckpointError, match=r"checkpoint .*/new is incomplete"):
        load_checkpoint(torch.nn.Linear(1, 1), None, tmp_path / "new")
    session.push(root=str(tmp_path))
    run(
        session,
        HELPERS,
        """
    model, opt = build(2, seed=3)
    load_checkpoint(model, opt, f"{root}/old")
    reloaded = full(model, opt)
    try:
        load_checkpoint(model, opt, f"{root}/new")
    except Exception as e:
        refused = str(e)
    """,
    )
    assert_same_state(session.eval("reloaded")[0], old_state)
    refused = session.eval("refused")[0]
    assert "incomplete" in refused and "new" in refused and "\n" not in refused


@pytest.mark.timeout(120)
def test_a_failed_write_is_reported_and_nothing_is_published(session, tmp_path):
    """A full disk on one rank: every rank raises one line naming it; no checkpoint, no leftovers."""
    session.push(root=str(tmp_path))
    run(
        session,
        HELPERS,
        """
    from torch.distributed.checkpoint import FileSystemWriter
    model, opt = build(1)
    save_checkpoint(model, opt, f"{root}/ckpt")           # an older checkpoint at the same path
    before = full(model, opt)
    train(model, opt, 1)
    write = FileSystemWriter.write_data
    def full_disk(self, plan, planner):
        if rank == 1:
            raise OSError(28, "No space left on device")
        return write(self, plan, planner)
    FileSystemWriter.write_data = full_disk
    try:
        save_checkpoint(model, opt, f"{root}/ckpt")
    except Exception as e:
        message = str(e)
    finally:
        FileSystemWriter.write_data = write
    model, opt = build(1, seed=9)
    load_checkpoint(model, opt, f"{root}/ckpt")
    after = full(model, opt)
    """,
    )
    for message in session.eval("message"):
        assert "rank 1" in message and "No space left on device" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # the old one, and no temporary directory
    assert_same_state(session.eval("after")[0], session.eval("before")[0])


@pytest.mark.timeout(120)
def test_merge_weights_gives_a_plain_model_identical_outputs(session, tmp_path):
    session.push(root=str(tmp_path))
    run(
        session,
        HELPERS,
        """
    model, opt = build(2)
    train(model, opt, 2)
    save_checkpoint(model, opt, f"{root}/sharded")
    probe = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    logits = model(probe)[0].detach()
    """,
    )
    probe = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    for safe in (True, False):
        written = merge_weights(tmp_path / "sharded", tmp_path / f"merged-{safe}", safe_serialization=safe)
        assert written.name == ("model.safetensors" if safe else "pytorch_model.bin")
        if safe:
            from safetensors.torch import load_file

            weights = load_file(str(written))
        else:
            weights = torch.load(written, weights_only=True)
        plain = GPT(GPTConfig.debug(), seed=123)
        plain.load_state_dict(weights, strict=True)
        torch.testing.assert_close(plain(probe)[0], session.eval("logits")[0], rtol=0, atol=0)


def test_cli_merge_weights_errors_are_one_line(tmp_path):
    def cli(*argv):
        out = subprocess.run(
            [sys.executable, "-m", "fsdp_nb.cli", "merge-weights", *argv], capture_output=True, text=True, timeout=120
        )
        return out.returncode, out.stderr.strip()

    code, err = cli(str(tmp_path / "missing"), str(tmp_path / "out"))
    assert code == 2 and err.startswith("fsdp-nb: error: no checkpoint at") and "\n" not in err
    (tmp_path / "empty").mkdir()
    code, err = cli(str(tmp_path / "empty"), str(tmp_path / "out"))
    assert code == 2 and "is not a checkpoint" in err and "\n" not in err
    model = torch.nn.Linear(3, 2)
    for name in ("step-000002", "step-000004"):
        save_checkpoint(model, None, tmp_path / "run" / name)
    code, err = cli(str(tmp_path / "run"), str(tmp_path / "out"))
    assert code == 2 and "holds 2: step-000002, step-000004; pass one of them" in err
    code, err = cli(str(tmp_path / "run" / "step-000004"), str(tmp_path / "out"), "--unsafe_serialization")
    assert code == 0 and (tmp_path / "out" / "pytorch_model.bin").is_file()


def test_load_refuses_what_does_not_fit_in_one_line(tmp_path):
    """In one process (no ranks needed): not a checkpoint, a different model, no optimizer state."""
    model = GPT(GPTConfig.debug(), seed=0)
    save_checkpoint(model, None, tmp_path / "gpt")
    wider = GPT(GPTConfig.debug(n_embd=64), seed=0)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(wider, None, tmp_path / "gpt")
    message = str(info.value)
    assert message.startswith(f"checkpoint {tmp_path / 'gpt'} does not match the model:") and "\n" not in message
    assert "wte.weight is (256, 32) in the checkpoint but (256, 64) in the model" in message
    deeper = GPT(GPTConfig.debug(n_layer=3), seed=0)
    with pytest.raises(CheckpointError, match=r"not in the checkpoint: blocks\.2\."):
        load_checkpoint(deeper, None, tmp_path / "gpt")
    with pytest.raises(CheckpointError, match="holds no optimizer state; pass optimizer=None"):
        load_checkpoint(model, torch.optim.AdamW(model.parameters()), tmp_path / "gpt")
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        load_checkpoint(model, None, tmp_path)
    (tmp_path / "file.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is not a checkpoint: expected a directory"):
        load_checkpoint(model, None, tmp_path / "file.pt")
    truncated = tmp_path / "gpt" / "__0_0.distcp"
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="incomplete or damaged: __0_0.distcp is 100 bytes"):
        load_checkpoint(model, None, tmp_path / "gpt")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("version", [1, 2])
def test_ram_efficient_loading_matches_a_normal_load_at_three_ranks(three_ranks, version):
    run(
        three_ranks,
        f"""
    from fsdp_nb.sharding import build_on_rank0
    config = FSDPConfig(fsdp_version={version}, cpu_ram_efficient_loading=True, use_orig_params=False,
                        auto_wrap_policy="TRANSFORMER_BASED_WRAP")
    built = build_on_rank0(lambda: GPT(GPTConfig.debug(), seed=11), config)
    on = built.wte.weight.device.type
    efficient = full(shard(built, config))
    normal = full(shard(GPT(GPTConfig.debug(), seed=11), FSDPConfig(fsdp_version={version})))
    """,
    )
    assert three_ranks.eval("on") == ["cpu", "meta", "meta"]
    for efficient, normal in zip(three_ranks.eval("efficient"), three_ranks.eval("normal")):
        assert_same_state(efficient, normal)


@pytest.mark.timeout(150)
def test_fsdp_nb_train_resumes_under_torchrun(tmp_path, torchrun):
    """`fsdp-nb train --checkpoint_dir ... --checkpoint_every 3`, then `--resume` from step 3: the same losses."""
    import json

    run_file = tmp_path / "run.yaml"
    run_file.write_text(
        "model: {size: debug}\ndata: {source: stdlib, max_bytes: 60000}\n"
        "train: {steps: 6, global_batch_size: 4, lr: 0.003, warmup_steps: 2, log_interval: 0}\n"
        "fsdp: {fsdp_version: 1, auto_wrap_policy: TRANSFORMER_BASED_WRAP}\n"
    )

    def train(*extra: str) -> None:
        torchrun(2, ["-m", "fsdp_nb.cli", "train", "--config", str(run_file), *extra], timeout=120)

    train(
        "--history",
        str(tmp_path / "straight.json"),
        "--checkpoint_dir",
        str(tmp_path / "ck"),
        "--checkpoint_every",
        "3",
    )
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step-000003", "step-000006"]
    train("--history", str(tmp_path / "resumed.json"), "--resume", str(tmp_path / "ck" / "step-000003"))
    straight = json.loads((tmp_path / "straight.json").read_text())
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], abs=1e-6, rel=0)


def test_a_save_replaces_only_an_older_checkpoint(tmp_path):
    """In one process: a directory of other things at the path is refused, untouched."""
    model = torch.nn.Linear(3, 2)
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="is a directory that is not a checkpoint"):
        save_checkpoint(model, None, tmp_path / "ckpts")
    assert (tmp_path / "ckpts" / "notes.txt").read_text() == "mine"
    save_checkpoint(model, None, tmp_path / "ok")
    save_checkpoint(model, None, tmp_path / "ok")  # an older checkpoint: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpts", "ok"]


@pytest.mark.timeout(120)
def test_an_async_save_keeps_extra_as_of_the_call_and_reports_its_error_once(session, tmp_path):
    """On two ranks, so the background write really runs on its own gloo group, from its thread."""
    session.push(root=str(tmp_path))
    run(
        session,
        HELPERS,
        """
    from torch.distributed.checkpoint import FileSystemWriter
    from fsdp_nb.checkpoint import CheckpointError, inspect
    from fsdp_nb.checkpoint import save as save_module

    model, opt = build(2)
    history = [1, 2]
    first = save_checkpoint(model, opt, f"{root}/a", async_save=True, extra={"history": history})
    group = save_module._checkpoint_group()
    history.append(3)  # after the call: not part of the checkpoint
    first.wait()
    extra = inspect(f"{root}/a").extra

    write_data = FileSystemWriter.write_data
    def full_disk(self, plan, planner):
        raise OSError(28, "No space left on device")
    if rank == 1:  # one rank's disk is full
        FileSystemWriter.write_data = full_disk
    try:
        handle = save_checkpoint(model, opt, f"{root}/b", async_save=True)
        try:
            handle.wait()
            error = None
        except CheckpointError as e:
            error = str(e)
    finally:
        FileSystemWriter.write_data = write_data
    load_checkpoint(model, opt, f"{root}/a")  # the error was delivered: it does not come back here
    outcome = (extra, group is not None and group is not dist.group.WORLD, error, handle.done())
    """,
    )
    for extra, own_group, error, done in session.eval("outcome"):
        assert extra == {"history": [1, 2]} and own_group and done
        assert "rank 1" in error and "No space left on device" in error  # the same failure, on every rank
    assert not (tmp_path / "b").exists()
