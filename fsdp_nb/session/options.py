"""SessionConfig: what `%fsdp_launch` / `Session(...)` accept, validated before anything starts."""

from __future__ import annotations

import os
from dataclasses import dataclass

from fsdp_nb.validate import is_int, is_number

DEVICES = ("cpu", "cuda")
BACKENDS = ("gloo", "nccl")


def max_ranks() -> int:
    """A sane ceiling for CPU ranks on this machine: 4 per core, at least 8."""
    return max(8, 4 * (os.cpu_count() or 1))


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass(frozen=True, kw_only=True)
class SessionConfig:
    nprocs: int = 2
    """Number of ranks (processes), 1 to max_ranks() on CPU, at most the GPU count on CUDA."""
    device: str = "cpu"
    """'cpu' (one process per rank, gloo) or 'cuda' (rank r uses GPU r)."""
    backend: str | None = None
    """'gloo' or 'nccl'; None picks gloo on CPU and nccl on CUDA."""
    timeout: float = 60.0
    """Process-group timeout in seconds: a rank stuck in a collective fails after this."""
    threads: int = 1
    """torch / OpenMP threads per rank; more than cores/ranks makes ranks fight for cores."""
    remote: bool = False
    """Ranks started by torchrun and attached (Session.listen): they run on their nodes' cores and GPUs,
    so this machine's limits do not apply."""

    def __post_init__(self):
        n = self.nprocs
        if not is_int(n) or n < 1:
            raise ValueError(f"nprocs={n!r} is not valid: give a whole number of ranks >= 1, e.g. -n 2")
        if self.device not in DEVICES:
            raise ValueError(f"device={self.device!r} is not valid: use one of {', '.join(DEVICES)}")
        backend = self.backend or ("nccl" if self.device == "cuda" else "gloo")
        if backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not valid: use one of {', '.join(BACKENDS)}")
        object.__setattr__(self, "backend", backend)
        if not is_number(self.timeout) or self.timeout <= 0:
            raise ValueError(f"timeout={self.timeout!r} is not valid: give seconds > 0, e.g. --timeout 60")
        t = self.threads
        if not is_int(t) or t < 1:
            raise ValueError(f"threads={t!r} is not valid: give a whole number >= 1, e.g. --threads 1")
        if self.remote:
            pass  # the nodes' cores and GPUs, not this machine's: torchrun's ranks check their own device
        elif backend == "nccl" or self.device == "cuda":
            gpus = _cuda_count()
            what = "--device cuda" if self.device == "cuda" else "--backend nccl"
            if gpus == 0:
                raise ValueError(f"{what} needs CUDA, but no GPU is visible here: use --device cpu (gloo)")
            if backend == "nccl" and self.device != "cuda":
                raise ValueError("--backend nccl needs --device cuda: nccl only moves GPU tensors")
            if n > gpus:
                raise ValueError(f"-n {n} needs {n} GPUs (one per rank) but {gpus} are visible: use -n {gpus} or fewer")
        elif n > max_ranks():
            raise ValueError(
                f"-n {n} is more ranks than this machine can run sensibly "
                f"(at most {max_ranks()}: 4 per CPU core); use a smaller -n"
            )

    def summary(self) -> str:
        return f"{self.nprocs} ranks{' attached' if self.remote else ''}, backend {self.backend}, device {self.device}"
