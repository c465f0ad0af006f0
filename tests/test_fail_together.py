"""A failure on one rank reaches every rank at once: no rank waits alone in a collective.

Each test makes one rank fail in the local part of a phase (shard, RAM-efficient
loading, save, load, trace) and checks that every rank raised, within 5 s, where
before the others sat in a broadcast until the process-group timeout (60 s here).
"""

import textwrap

import pytest

from fsdp_nb.phases import PeerFailure, fail_together, peer_message
from fsdp_nb.session.output import Silent

WITHIN_S = 5.0

SETUP = """
import warnings
warnings.filterwarnings("ignore")
import torch
from fsdp_nb.config import FSDPConfig
from fsdp_nb.loading import build_on_rank0
from fsdp_nb.models import GPT, GPTConfig
from fsdp_nb.sharding import shard
"""


def failing_cell(session, source: str):
    """Run `source`; every rank must fail, each within WITHIN_S. Returns {rank: RemoteError}."""
    result = session.run(SETUP + textwrap.dedent(source), output=Silent())
    errors = dict(result.errors)
    assert sorted(errors) == [0, 1], f"expected both ranks to fail, got {result}"
    for rank, done in result.dones.items():
        assert done.elapsed < WITHIN_S, f"rank {rank} took {done.elapsed:.1f} s to fail: it waited for a peer"
    assert not result.stuck and result.broken is None
    return errors


def test_without_a_process_group_the_error_is_simply_raised():
    with pytest.raises(KeyError):
        with fail_together("phase"):
            raise KeyError("x")
    with fail_together("phase"):
        pass


def test_the_peer_message_names_the_rank_the_phase_and_the_error():
    text = peer_message("shard()", [(1, "ValueError: bad"), (2, "ValueError: bad")])
    assert text.startswith("shard(): rank 1 failed (and 1 more rank) with ValueError: bad")


@pytest.mark.timeout(40)
def test_a_class_name_missing_on_one_rank_fails_shard_on_both(session):
    errors = failing_cell(
        session,
        """
        names = ["NoSuchBlock"] if rank == 1 else None
        config = FSDPConfig(auto_wrap_policy="TRANSFORMER_BASED_WRAP", transformer_cls_names_to_wrap=names)
        shard(GPT(GPTConfig.debug()), config)
        """,
    )
    assert errors[1].type == "ValueError" and "NoSuchBlock" in errors[1].message
    assert errors[0].type == PeerFailure.__name__ and "rank 1 failed with ValueError" in errors[0].message


@pytest.mark.timeout(40)
@pytest.mark.parametrize("version", [1, 2])
def test_rank0_missing_a_weight_fails_ram_efficient_loading_on_every_rank(session, version):
    errors = failing_cell(
        session,
        f"""
        config = FSDPConfig(fsdp_version={version}, auto_wrap_policy="TRANSFORMER_BASED_WRAP",
                            activation_checkpointing=True, cpu_ram_efficient_loading=True)
        model = build_on_rank0(lambda: GPT(GPTConfig.debug()), config)
        import fsdp_nb.sharding as sharding
        original = sharding.rank0_state
        if rank == 0:  # rank 0's weights lack the final norm (a checkpoint of another model, say)
            sharding.rank0_state = lambda m: {{k: v for k, v in original(m).items() if not k.startswith("ln_f")}}
        try:
            shard(model, config)
        finally:
            sharding.rank0_state = original
        """,
    )
    assert errors[0].type == "KeyError" and "ln_f" in errors[0].message
    assert errors[1].type == PeerFailure.__name__ and "rank 0 failed with KeyError" in errors[1].message


@pytest.mark.timeout(40)
def test_a_meta_model_on_rank0_is_refused_on_every_rank(session):
    errors = failing_cell(
        session,
        """
        config = FSDPConfig(fsdp_version=2, cpu_ram_efficient_loading=True, auto_wrap_policy="TRANSFORMER_BASED_WRAP")
        with torch.device("meta"):
            model = GPT(GPTConfig.debug())
        shard(model, config)
        """,
    )
    assert "build_on_rank0" in errors[0].message
    assert errors[1].type == PeerFailure.__name__


@pytest.mark.timeout(40)
def test_rank0_unable_to_prepare_a_save_fails_it_everywhere(session, tmp_path):
    errors = failing_cell(
        session,
        f"""
        from fsdp_nb.checkpoint import save_checkpoint, store
        model = shard(GPT(GPTConfig.debug()), FSDPConfig(fsdp_version=2))
        original = store.token
        if rank == 0:
            def refuse():
                raise PermissionError(13, "Permission denied", "ckpt")
            store.token = refuse
        try:
            save_checkpoint(model, None, {str(tmp_path / "ckpt")!r})
        finally:
            store.token = original
        """,
    )
    for e in errors.values():
        assert e.type == "CheckpointError" and "Permission denied" in e.message


@pytest.mark.timeout(40)
def test_a_recorder_that_cannot_hook_one_rank_refuses_the_trace_everywhere_and_leaves_no_hook(session):
    errors = failing_cell(
        session,
        """
        import torch.distributed as dist
        from fsdp_nb._torch import TorchInternalsError
        from fsdp_nb.trace import capture, trace_step
        model = shard(GPT(GPTConfig.debug()), FSDPConfig(fsdp_version=2, auto_wrap_policy="TRANSFORMER_BASED_WRAP"))
        x = torch.randint(0, 256, (2, 16))
        gather_before, original = dist.all_gather_into_tensor, capture.collective_functions
        if rank == 1:
            def gone():
                raise TorchInternalsError("torch lacks a collective (simulated)")
            capture.collective_functions = gone
        try:
            trace_step(lambda: model(x, x)[1].backward(), model=model)
        finally:
            capture.collective_functions = original
            hooks_left = dist.all_gather_into_tensor is not gather_before
        """,
    )
    assert errors[1].type == "TorchInternalsError"
    assert errors[0].type == PeerFailure.__name__ and "trace_step" in errors[0].message
    assert session.eval("hooks_left") == [False, False]


@pytest.mark.timeout(40)
def test_a_checkpoint_one_rank_cannot_see_fails_the_load_on_every_rank_alike(session, tmp_path):
    errors = failing_cell(
        session,
        f"""
        from fsdp_nb.checkpoint import load_checkpoint, save_checkpoint
        model = shard(GPT(GPTConfig.debug()), FSDPConfig(fsdp_version=2))
        save_checkpoint(model, None, {str(tmp_path / "ckpt")!r})
        # rank 1 looks on a filesystem that does not have it (a node-local path, say)
        load_checkpoint(model, None, {str(tmp_path / "ckpt")!r} if rank == 0 else {str(tmp_path / "elsewhere")!r})
        """,
    )
    assert errors[0].headline() == errors[1].headline()  # the same CheckpointError, word for word
    assert errors[1].type == "CheckpointError" and "elsewhere" in errors[1].message
