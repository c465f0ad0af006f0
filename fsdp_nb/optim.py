"""The optimizer side of a training step: the learning-rate schedule, AdamW, the global gradient norm.

`config` below is a `fsdp_nb.train.TrainConfig` (read for its fields only, so this
module does not import the loop that imports it).

Kept apart from the loop (train.py) because each is a choice the step timelines
measured: which AdamW kernel, and how the norm of FSDP2's sharded gradients is taken.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def lr_at(step: int, config) -> float:
    """Learning rate for 0-based `step`: linear warm-up, then cosine to min_lr (or constant)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    decay_steps = max(1, config.steps - config.warmup_steps - 1)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def make_adamw(params: list, config) -> torch.optim.Optimizer:
    """AdamW over `params`, fused into one kernel per dtype where torch has one (CPU and CUDA do).

    Unfused AdamW on CPU steps each parameter one op at a time: with FSDP2's one
    DTensor per parameter that was the largest gap to FSDP1's few FlatParameters in
    the step timelines (about 9 ms against 1.5 ms on the 2-rank benchmark GPT). The
    fused kernel is elementwise, so a shard gets the same update as in one process.
    """
    kwargs = dict(lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    if all(p.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64) for p in params):
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
            pass
    return torch.optim.AdamW(params, foreach=True, **kwargs)


def clip_sharded_grads(grads: list, max_norm: float) -> float:
    """Global 2-norm of FSDP2's sharded gradients, clipped to `max_norm`; the same as
    `clip_grad_norm_` over the DTensors, without their per-parameter dispatch.

    Every FSDP2 gradient is a DTensor sharded on dim 0: `(Shard(0),)` on a 1-D mesh,
    `(Replicate(), Shard(0))` on HSDP's 2-D one, where each row of the mesh holds the
    whole gradient once. So the squares of the local shards summed over one shard
    group (the last mesh dim) are the squares of the whole gradient: one foreach
    kernel, one all-reduce. Through DTensor, the same norm took 28 dispatches and
    several collectives per step (about 4 ms of the 2-rank benchmark's step).
    """
    if not grads:
        return 0.0
    mesh = _shard_mesh(grads)
    if mesh is None:  # parameters FSDP left whole, TP's 2-D placements, or several meshes
        norm = float(_norm_by_layout(grads))
        if max_norm != float("inf"):
            coef = min(max_norm / (norm + 1e-6), 1.0)  # clip_grad_norm_'s coefficient
            for g in grads:
                g.mul_(coef)
        return norm
    local = [g.to_local() for g in grads]
    squares = torch.nn.utils.get_total_norm(local, 2.0, foreach=True).pow(2)  # this rank's share of |g|^2
    if dist.is_initialized():
        # the shard group: summing down the replicate dim too would count every element R times
        dist.all_reduce(squares, group=mesh.get_group(mesh.ndim - 1))
    norm = squares.sqrt()
    if max_norm != float("inf"):  # g *= min(max_norm / (norm + 1e-6), 1), one foreach kernel
        torch.nn.utils.clip_grads_with_norm_([_GradHolder(t) for t in local], max_norm, norm, foreach=True)
    return float(norm)


def _norm_by_layout(grads: list) -> torch.Tensor:
    """The 2-norm of `grads` in any mix of layouts: per (mesh, placements) group through DTensor, then summed.

    One `get_total_norm` over all of them stacks the per-tensor norms, which fails
    ("torch.stack" on DTensors of different meshes) under tensor parallelism: the
    planned layers live on the (dp, tp) mesh, embeddings and norms on the dp mesh.
    Each group's norm is made a full tensor (its all-reduce) before they are combined.
    """
    from torch.distributed.tensor import DTensor

    groups: dict = {}
    for g in grads:
        key = (id(g.device_mesh), tuple(g.placements)) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    squares = []
    for members in groups.values():
        norm = torch.nn.utils.get_total_norm(members, 2.0, foreach=True)
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).pow(2))
    return torch.stack(squares).sum().sqrt()


def _shard_mesh(grads: list):
    """The one mesh all `grads` are FSDP-sharded on, or None when the shortcut does not apply."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = getattr(grads[0], "device_mesh", None)
    placements = {1: (Shard(0),), 2: (Replicate(), Shard(0))}.get(getattr(mesh, "ndim", 0))
    same = all(isinstance(g, DTensor) and g.device_mesh is mesh and g.placements == placements for g in grads)
    return mesh if placements and same else None


class _GradHolder:
    """What `clip_grad_norm_` reads from a parameter: its `.grad` (the gradient itself, clipped in place)."""

    def __init__(self, grad):
        self.grad = grad
