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

    [Note: the norm of sharded gradients]
    A gradient's local piece is held by c ranks at once: c = world / (pieces the
    gradient is cut into), where the pieces are the product of the mesh dims that
    shard it (`Shard`, `_StridedShard`) and a dim that replicates it (HSDP's replicas,
    `Replicate()` on tp) or a rank outside its mesh (TP peers of a parameter off the
    plan) holds a copy. So the sum over all ranks of (local squares) / c is |g|^2,
    for any mix of meshes and placements: one foreach kernel per c, one scalar
    all-reduce over the world. Through DTensor the same norm took a dispatch per
    parameter and collectives per (mesh, placements) group, and under TP torch warns
    about the two sequential all-reduces of each 2-D group.
    """
    if not grads:
        return 0.0
    world = dist.get_world_size() if dist.is_initialized() else 1
    by_copies: dict[int, list] = {}
    for g in grads:
        by_copies.setdefault(_copies(g, world), []).append(g.to_local() if hasattr(g, "to_local") else g)
    squares = sum(torch.nn.utils.get_total_norm(local, 2.0, foreach=True).pow(2) / c for c, local in by_copies.items())
    if world > 1:
        dist.all_reduce(squares)
    norm = squares.sqrt()
    if max_norm != float("inf"):  # g *= min(max_norm / (norm + 1e-6), 1), one foreach kernel
        local = [t for members in by_copies.values() for t in members]
        torch.nn.utils.clip_grads_with_norm_([_GradHolder(t) for t in local], max_norm, norm, foreach=True)
    return float(norm)


def _copies(g, world: int) -> int:
    """How many ranks hold the same local piece of `g` [Note: the norm of sharded gradients]."""
    mesh = getattr(g, "device_mesh", None)
    if mesh is None:  # a plain tensor: every rank holds all of it
        return world
    pieces = 1
    for dim, placement in enumerate(g.placements):
        if getattr(placement, "dim", None) is not None:  # Shard and _StridedShard (whose is_shard() is False)
            pieces *= mesh.size(dim)
    return world // pieces


class _GradHolder:
    """What `clip_grad_norm_` reads from a parameter: its `.grad` (the gradient itself, clipped in place)."""

    def __init__(self, grad):
        self.grad = grad
