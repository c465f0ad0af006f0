"""The nccl/CUDA path. Skipped without at least 2 GPUs (CI has none)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180), pytest.mark.skipif(gpus < 1, reason="needs CUDA")]


@pytest.mark.skipif(gpus < 2, reason="needs 2 GPUs")
def test_nccl_session_one_gpu_per_rank():
    from fsdp_nb import Session

    with Session(2, device="cuda") as s:
        assert s.config.backend == "nccl"
        vals = s.eval(
            "(lambda t: (dist.all_reduce(t), t.item(), str(t.device), torch.cuda.current_device())[1:])"
            "(torch.ones(1, device=device) * (rank + 1))"
        )
        assert vals == [(3.0, "cuda:0", 0), (3.0, "cuda:1", 1)]


def test_more_ranks_than_gpus_is_a_clear_error():
    from fsdp_nb.session.options import SessionConfig

    with pytest.raises(ValueError, match=f"-n {gpus + 1} needs {gpus + 1} GPUs"):
        SessionConfig(nprocs=gpus + 1, device="cuda")


@pytest.mark.skipif(gpus < 1, reason="needs CUDA")
def test_single_gpu_session():
    from fsdp_nb import Session

    with Session(1, device="cuda") as s:
        assert s.eval("str(device)") == ["cuda:0"]


# ---- checkpoint, trace and loading on one GPU ------------------------------------------------
GPU_SETUP = """
import warnings
warnings.filterwarnings("ignore")
import torch
from fsdp_nb import FSDPConfig, Trainer, TrainConfig, shard
from fsdp_nb.data import ByteBlocks, stdlib_corpus
from fsdp_nb.loading import build_on_rank0
from fsdp_nb.models import GPT, GPTConfig
data = ByteBlocks(stdlib_corpus(40_000), 64)
def trainer(version, **options):
    config = FSDPConfig(fsdp_version=version, auto_wrap_policy="TRANSFORMER_BASED_WRAP", **options)
    model = build_on_rank0(lambda: GPT(GPTConfig(n_layer=4, n_embd=256, n_head=4, block_size=64), seed=0), config)
    return Trainer(model, data, TrainConfig(steps=4, global_batch_size=8, log_interval=0), fsdp=config)
"""


@pytest.fixture(scope="module")
def gpu_session():
    from fsdp_nb import Session

    with Session(1, device="cuda") as s:
        s.run(GPU_SETUP).raise_errors()
        yield s


@pytest.mark.parametrize("version", [1, 2])
def test_an_async_snapshot_stays_in_cpu_memory(gpu_session, version, tmp_path):
    gpu_session.run(
        f"""
t = trainer({version})
t.fit()
torch.cuda.synchronize()
before = torch.cuda.memory_allocated()
from fsdp_nb.checkpoint import save_checkpoint, load_checkpoint
pending = save_checkpoint(t.model, t.optimizer, {str(tmp_path / "a")!r}, async_save=True)
grew = torch.cuda.memory_allocated() - before   # a snapshot on the GPU would be the model and AdamW again
state_bytes = sum(p.numel() * p.element_size() for p in t.model.parameters()) * 3
pending.wait()
load_checkpoint(t.model, t.optimizer, {str(tmp_path / "a")!r})
"""
    ).raise_errors()
    grew, state_bytes = gpu_session.eval("(grew, state_bytes)")[0]
    assert grew < 0.05 * state_bytes, f"the async snapshot took {grew} bytes of GPU memory"


def test_fsdp1_full_state_dicts_are_gathered_to_cpu(gpu_session):
    gpu_session.run(
        """
from fsdp_nb.checkpoint import state as S
t = trainer(1)
t.fit()
full = S.full_state(t.model, t.optimizer)
devices = {v.device.type for v in full["model"].values()}
"""
    ).raise_errors()
    assert gpu_session.eval("devices") == [{"cpu"}]


@pytest.mark.parametrize("version", [1, 2])
def test_ram_efficient_loading_and_a_trace_on_cuda(gpu_session, version):
    gpu_session.run(
        f"""
from fsdp_nb import trace_step
t = trainer({version}, cpu_ram_efficient_loading=True, activation_checkpointing=True, mixed_precision="bf16")
losses = [h["loss"] for h in t.fit()]
trace = trace_step(t, steps=1)
"""
    ).raise_errors()
    losses = gpu_session.eval("losses")[0]
    assert all(loss == loss and 0 < loss < 7 for loss in losses) and losses[-1] < losses[0]
    trace = gpu_session.eval("trace")[0]
    assert trace.clock == "launch" and trace.count("all_gather") > 0
