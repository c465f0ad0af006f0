"""What one rank really holds for a sharded module: bytes of parameters, gradients and optimizer state.

Counted from storages, not shapes: each storage once, whole, so FSDP's padding
counts, and `real` is the part covered by parameter data. The layout model's
`bytes_per_rank` predicts the parameter part from shapes alone; tests compare them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from fsdp_nb._torch import flat_info, fsdp1_handles
from fsdp_nb.layout.specs import RankBytes


@dataclass(frozen=True, kw_only=True)
class MemoryReport:
    """Real storage bytes on one rank, from `memory_of`: parameters, gradients, optimizer state."""

    rank: int
    world_size: int
    params: RankBytes
    grads: RankBytes
    optimizer: RankBytes

    @property
    def total(self) -> int:
        return self.params.total + self.grads.total + self.optimizer.total


class _Ledger:
    """Unique storages (by data pointer) and the byte ranges of real data inside them."""

    def __init__(self):
        self.nbytes: dict[int, int] = {}
        self.real: dict[int, list[tuple[int, int]]] = {}

    def add(self, t: torch.Tensor, pieces=None) -> None:
        """`pieces`: (element offset, numel) of real data in flat `t`; None means all of `t`."""
        if isinstance(t, DTensor):
            t = t.to_local()
        storage = t.untyped_storage()
        if storage.nbytes() == 0:  # e.g. a use_orig_params view with nothing on this rank
            return
        ptr, item, base = storage.data_ptr(), t.element_size(), t.storage_offset()
        self.nbytes[ptr] = storage.nbytes()
        for start, numel in pieces if pieces is not None else [(0, t.numel())]:
            self.real.setdefault(ptr, []).append(((base + start) * item, (base + start + numel) * item))

    def bytes(self) -> RankBytes:
        real = 0
        for ranges in self.real.values():  # union of possibly overlapping views
            end = 0
            for a, b in sorted(ranges):
                real += max(0, b - max(a, end))
                end = max(end, b)
        total = sum(self.nbytes.values())
        return RankBytes(real=real, padding=total - real)


def memory_of(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
    """Bytes this rank really holds for parameters, gradients and optimizer state.

    Storages are counted once each, whole, so padding counts; `real` is the part
    covered by parameter data. Call it between steps, when parameters are sharded.
    """
    pieces = {}
    for h in fsdp1_handles(module).values():  # FSDP1: real pieces of each local FlatParameter chunk
        info = flat_info(h)
        real = [(p.offset, p.stop - p.start) for p in info.pieces if p is not None]
        pieces[id(info.flat)] = (info.flat, real)
    tensors = list(pieces.values()) + [(p, None) for p in module.parameters() if id(p) not in pieces]
    params, grads, optim = _Ledger(), _Ledger(), _Ledger()
    for t, real in tensors:
        params.add(t, real)
        if t.grad is not None:
            grads.add(t.grad, real if t.grad.numel() == t.numel() else None)
    if optimizer is not None:
        for p, state in optimizer.state.items():
            real = pieces[id(p)][1] if id(p) in pieces else None
            for value in state.values():
                if isinstance(value, torch.Tensor):  # exp_avg like the FlatParameter chunk, or a scalar step
                    optim.add(value, real if real is not None and value.numel() == p.numel() else None)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return MemoryReport(
        rank=rank, world_size=world, params=params.bytes(), grads=grads.bytes(), optimizer=optim.bytes()
    )
