"""The stale-optimizer guard.

[Note: stale optimizers] Sharding replaces parameters (FSDP2 registers new
DTensor Parameters; FSDP1 without `use_orig_params` registers FlatParameters).
An optimizer built before `shard()` still holds the old tensors, which no longer
get gradients, so `step()` silently does nothing. `shard()` records the replaced
parameters, and a process-wide optimizer pre-step hook raises if an optimizer
still holds one. `check_optimizer(model, optimizer)` runs the same check on demand.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

_replaced: dict[int, weakref.ref] = {}
_hook_handle = None


def remember_replaced(before: list[nn.Parameter], sharded: nn.Module) -> None:
    global _hook_handle
    current = {id(p) for p in sharded.parameters()}
    for p in before:
        if id(p) not in current:
            _replaced[id(p)] = weakref.ref(p, _forget(id(p)))
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_pre_hook(_refuse_stale)


def _forget(key: int):
    """The weakref callback that drops `key` once its parameter is garbage-collected."""
    return lambda _ref: _replaced.pop(key, None)


def _held_replaced(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    if not _replaced:  # the common case: nothing was ever replaced, or it is all gone
        return []
    held = [p for g in optimizer.param_groups for p in g["params"]]
    return [p for p in held if (ref := _replaced.get(id(p))) is not None and ref() is p]


def _refuse_stale(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    stale = _held_replaced(optimizer)
    if stale:
        raise RuntimeError(_stale_message(len(stale), sum(len(g["params"]) for g in optimizer.param_groups)))


def _stale_message(n_stale: int, n_held: int) -> str:
    return (
        f"this optimizer holds {n_stale} of its {n_held} tensors from before shard(): FSDP replaced "
        "those parameters, so they get no gradients and step() would silently train nothing. "
        "Build the optimizer after sharding: optimizer = torch.optim.AdamW(sharded.parameters(), ...)"
    )


def check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Raise if `optimizer` holds tensors that are not `model`'s current parameters
    (the sign of an optimizer built before sharding). Returns None when all is well."""
    current = {id(p) for p in model.parameters()}
    held = [p for g in optimizer.param_groups for p in g["params"]]
    stale = [p for p in held if id(p) not in current]
    if stale:
        raise RuntimeError(_stale_message(len(stale), len(held)))
