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
