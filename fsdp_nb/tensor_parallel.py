"""Tensor parallelism (TP) before FSDP2: a plan in Hugging Face's words, applied with torch's public API.

A plan maps module names to a style, as Hugging Face's `base_model_tp_plan` does:
`{"blocks.*.mlp.fc": "colwise", "blocks.*.mlp.proj": "rowwise"}`, `*` standing for
one name part (a layer index). "colwise" is torch's `ColwiseParallel()` (the
weight's rows, the output features, split across the TP group: each rank computes
its columns of the output), "rowwise" is `RowwiseParallel()` (the weight's columns
split: each rank multiplies its part of the input, and the outputs are summed).
A colwise layer feeding a rowwise one needs no communication in between.

The recipe, and why the order matters:
1. `resolve_plan` turns the plan into module objects and checks it: only local
   checks, run where the ranks agree on the outcome [Note: fail together].
2. `apply_plan` (a collective: `distribute_tensor` scatters rank 0's weights)
   turns each planned parameter into a DTensor on the "tp" dim of the mesh.
3. `fully_shard` then shards every parameter over the data-parallel dims: a TP
   parameter becomes a DTensor on the whole (dp, tp) mesh, such as `l1.weight`
   `(_StridedShard(dim=0, sf=2), Shard(dim=0))`. Parameters the plan leaves out
   (embeddings, norms, the head) stay on the data-parallel mesh alone.

[Note: TP ranks]
The mesh is (S, T) or (R, S, T), row-major, tp last: rank = dp_index·T + t. The T
ranks of a TP group compute one model together, so they take the same rows of
the batch: the data-parallel rank is rank // T, of world / T.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fsdp_nb.layout.tp_plan import check_styles, plan_regex


def plan_of(model: nn.Module, tp_plan: dict[str, str] | None) -> dict[str, str]:
    """The plan to apply: `tp_plan` when given, else the model's own `base_model_tp_plan` (Hugging Face's name)."""
    if tp_plan is not None:
        return dict(tp_plan)
    own = getattr(model, "base_model_tp_plan", None) or getattr(
        getattr(model, "config", None), "base_model_tp_plan", None
    )
    if not own:
        raise ValueError(
            f"tp_size > 1 needs a tensor-parallel plan, and {type(model).__name__} has no base_model_tp_plan; "
            'pass shard(model, config, tp_plan={"l1": "colwise", "l2": "rowwise"}) (words: colwise, rowwise)'
        )
    return dict(own)


def resolve_plan(model: nn.Module, plan: dict[str, str], tp: int) -> list[tuple[str, nn.Module, str]]:
    """`(name, module, style)` for each planned module; every refusal is one ValueError line."""
    check_styles(plan)
    _check_heads(model, tp)
    modules = dict(model.named_modules())
    found = []
    for pattern, style in plan.items():
        regex = plan_regex(pattern)
        names = [n for n in modules if n and regex.fullmatch(n)]
        if not names:
            raise ValueError(f"tp_plan key {pattern!r} matches no submodule of {type(model).__name__}")
        for name in names:
            module = modules[name]
            if not isinstance(module, nn.Linear):
                raise ValueError(
                    f"tp_plan[{pattern!r}]={style!r} names {name}, a {type(module).__name__}; colwise and rowwise "
                    "apply to nn.Linear"
                )
            size = module.out_features if style == "colwise" else module.in_features
            if size % tp:
                what = "out_features" if style == "colwise" else "in_features"
                raise ValueError(
                    f"tp_plan: {name} is {style} on tp_size={tp} but its {what}={size} does not split evenly; "
                    f"use a tp_size that divides {size}"
                )
            found.append((name, module, style))
    return found


def _check_heads(model: nn.Module, tp: int) -> None:
    """Attention heads must split evenly: each TP rank computes whole heads."""
    config = getattr(model, "config", None)
    heads = getattr(config, "n_head", None) or getattr(config, "num_attention_heads", None)
    if heads and heads % tp:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        raise ValueError(
            f"tp_size={tp} does not divide the {heads} attention heads of {type(model).__name__}: each "
            f"tensor-parallel rank computes whole heads; use tp_size in {divisors}"
        )


def apply_plan(found: list[tuple[str, nn.Module, str]], tp_mesh: Any) -> None:
    """Turn each planned module's parameters into DTensors on `tp_mesh` (a collective: every rank is here)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for _, module, style in found:
        parallelize_module(module, tp_mesh, styles[style]())


def data_parallel_rank(rank: int, world_size: int, tp: int) -> tuple[int, int]:
    """(data-parallel rank, number of data-parallel ranks): TP peers share one [Note: TP ranks]."""
    return rank // tp, world_size // tp
