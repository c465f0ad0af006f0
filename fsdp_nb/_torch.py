"""Every private torch name fsdp_nb uses, in one place, each with what it is for.

[Note: one door for torch internals]
FSDP1's FlatParameter metadata, FSDP2's per-parameter state, the wrapper prefixes
that torch puts into module names: fsdp_nb needs them to draw what torch built, to
fill shards from rank 0 and to time a step, and torch promises none of them. When
torch renames one, this file changes, and the error names the symbol and the torch
releases fsdp_nb supports, rather than half the features degrading quietly.

Rules:
- nothing else in `fsdp_nb/` names a private torch symbol (`tests/test_torch_internals.py`
  reads every module's AST);
- every private name is listed in `SYMBOLS`, with what it is for; the same test builds
  real FSDP1 and FSDP2 modules on a fake process group and checks each one;
- an accessor that finds a name missing raises `TorchInternalsError`, which names it
  and the supported range; no accessor falls back to a default.
Every entry holds on torch 2.10 through 2.14.1 (`SUPPORTED_TORCH`, checked against pyproject.toml).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SUPPORTED_TORCH = ">=2.10,<=2.14.1"  # the range in pyproject.toml, which a test keeps equal

# The wrappers torch puts between a module and its children, as they appear in module and
# parameter names: FSDP1's wrapper, activation checkpointing's and torch.compile's
# OptimizedModule. State dicts leave them out; named_modules() and FlatParameter names keep them.
WRAPPER_NAMES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


class TorchInternalsError(RuntimeError):
    """A private torch name fsdp_nb relies on is missing from the installed torch."""


@dataclass(frozen=True)
class Symbol:
    """One private name: where it lives and what fsdp_nb uses it for."""

    name: str  # "FlatParameter._fqns": a class (or module) and the attribute
    why: str
    on: str  # which object the existence test checks it on: "torch", "fsdp1_handle", "fsdp1_flat", ...


SYMBOLS: tuple[Symbol, ...] = (
    Symbol("torch.distributed.fsdp._traversal_utils._get_fsdp_handles", "find FSDP1's FlatParamHandles", "torch"),
    Symbol("FlatParamHandle._fully_sharded_module", "name the module a FlatParameter belongs to", "fsdp1_handle"),
    Symbol("FlatParamHandle._use_orig_params", "read use_orig_params per unit", "fsdp1_handle"),
    Symbol("FlatParamHandle._orig_param_dtype", "the parameters' dtype before mixed precision", "fsdp1_handle"),
    Symbol("FlatParamHandle._sharding_strategy", "tell hybrid (HSDP) FlatParameters apart", "fsdp1_handle"),
    Symbol("FlatParameter._fqns", "the names of the parameters inside a FlatParameter", "fsdp1_flat"),
    Symbol("FlatParameter._shapes", "their shapes", "fsdp1_flat"),
    Symbol("FlatParameter._params", "their requires_grad with use_orig_params=True", "fsdp1_flat_orig"),
    Symbol("FlatParameter._shard_param_infos", "which elements of each parameter a shard holds", "fsdp1_flat"),
    Symbol("FlatParameter._numels_with_padding", "the padded flat layout", "fsdp1_flat"),
    Symbol("FlatParameter._is_padding_mask", "which entries of it are padding", "fsdp1_flat"),
    Symbol("FlatParameter._sharded_size", "the local shard's numel, padding included", "fsdp1_flat"),
    Symbol("FlatParameter._full_param_padded", "the gathered buffer, sampled by the timeline", "fsdp1_flat"),
    Symbol("FullyShardedDataParallel._handle", "the root unit's FlatParamHandle", "fsdp1_root"),
    Symbol("torch.distributed.fsdp._flat_param.FlatParamHandle.unshard", "timeline: FSDP1 all-gathers", "torch"),
    Symbol("torch.distributed.fsdp._runtime_utils._reduce_grad", "timeline: FSDP1 reduce-scatters", "torch"),
    Symbol("FSDPModule._get_fsdp_state", "FSDP2's per-module state", "fsdp2_module"),
    Symbol("FSDPState._fsdp_param_group", "the unit's parameter group", "fsdp2_state"),
    Symbol("FSDPParamGroup._module_fqn", "the unit's name, for timelines", "fsdp2_group"),
    Symbol("FSDPParamGroup._all_gather_result", "a prefetched gather, for memory timelines", "fsdp2_group"),
    Symbol("FSDPParam._module_info", "which module and name a sharded parameter belongs to", "fsdp2_param"),
    Symbol("FSDPParam.sharded_param", "the DTensor", "fsdp2_param"),
    Symbol("FSDPParam.fsdp_placement", "the dimension FSDP2 shards", "fsdp2_param"),
    Symbol("FSDPParam.mesh_info", "this rank's place in the shard group", "fsdp2_param"),
    Symbol("FSDPParam.padded_sharded_param_size", "the padded shard, for layouts and timelines", "fsdp2_param"),
    Symbol("FSDPParam.all_gather_outputs", "gathered buffers, sampled by the timeline", "fsdp2_param"),
    Symbol(
        "torch.distributed.fsdp._fully_shard._fsdp_param_group.FSDPParamGroup.unshard",
        "timeline: FSDP2 all-gathers",
        "torch",
    ),
    Symbol(
        "torch.distributed.fsdp._fully_shard._fsdp_param_group.FSDPParamGroup.wait_for_unshard",
        "timeline: waits for a gather",
        "torch",
    ),
    Symbol(
        "torch.distributed.fsdp._fully_shard._fsdp_param_group.FSDPParamGroup.post_backward",
        "timeline: FSDP2 reduce-scatters",
        "torch",
    ),
    Symbol(
        "torch.distributed.algorithms._checkpoint.checkpoint_wrapper.checkpoint_wrapper",
        "activation checkpointing per unit (what Accelerate applies)",
        "torch",
    ),
    Symbol("torch.distributed.fsdp.wrap._Policy._run_policy", "ask a torch wrap policy object for its units", "torch"),
    Symbol("torch._C._current_graph_task_id", "timeline: is autograd running backward now", "torch"),
    Symbol(
        "torch.distributed._functional_collectives.all_reduce",
        "timeline: tensor parallelism's collectives (DTensor calls the functional collectives, looked up at "
        "call time from this module, not torch.distributed's)",
        "torch",
    ),
    Symbol(
        "torch.distributed._functional_collectives.wait_tensor",
        "timeline: the wait on a functional collective's result, which ends its span",
        "torch",
    ),
    Symbol(
        "torch.distributed._functional_collectives.AsyncCollectiveTensor",
        "timeline: the async result of a functional collective; its `elem` is what a later wait receives",
        "torch",
    ),
    Symbol(
        "torch.distributed._shard.sharded_tensor.ShardedTensor._init_from_local_shards_and_global_metadata",
        "async saves of FSDP1: a ShardedTensor around copied shards",
        "torch",
    ),
    Symbol("torch.distributed._shard.sharded_tensor.Shard", "the shards of that ShardedTensor", "torch"),
    Symbol(
        "torch.distributed.tensor._redistribute.logger",
        "hide DTensor's notice about sequential all-gathers while a checkpoint gathers (dp, tp) parameters",
        "torch",
    ),
)


def _missing(symbol: str, why: str, error: BaseException) -> TorchInternalsError:
    return TorchInternalsError(
        f"torch {torch.__version__} lacks {symbol}, which fsdp_nb uses to {why} ({type(error).__name__}: "
        f"{error}); fsdp_nb supports torch{SUPPORTED_TORCH}: install a torch in that range"
    )


def _door(symbol: str, why: str) -> Callable:
    """Turn the AttributeError/ImportError of a renamed private name into a TorchInternalsError that names it."""

    def wrap(fn):
        @functools.wraps(fn)
        def checked(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (AttributeError, ImportError) as e:
                raise _missing(symbol, why, e) from e

        return checked

    return wrap


def resolve(dotted: str) -> Any:
    """The object a dotted `torch....` path names; raises TorchInternalsError when it is gone."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError as e:
            raise _missing(dotted, "run", e) from e
        return obj
    raise _missing(dotted, "run", ImportError(dotted))


# ---- names -------------------------------------------------------------------------------


def clean_name(name: str) -> str:
    """A module or parameter name as the user's model spells it, without torch's wrapper parts.

    "blocks.0._fsdp_wrapped_module._checkpoint_wrapped_module.ln_1.weight" -> "blocks.0.ln_1.weight";
    "l2._fsdp_wrapped_module" -> "l2"; the root's "_fsdp_wrapped_module" -> "".
    """
    return ".".join(part for part in name.split(".") if part not in WRAPPER_NAMES)


def joined(prefix: str, name: str) -> str:
    """`prefix.name`, or `name` for the root (prefix "")."""
    return f"{prefix}.{name}" if prefix else name


# ---- FSDP1 ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardPiece:
    """Elements [start, stop) of a flattened parameter sit at `offset` of this rank's FlatParameter shard."""

    offset: int
    start: int
    stop: int


@dataclass(frozen=True)
class FlatInfo:
    """What one FSDP1 FlatParameter holds, read from torch's own metadata (never from freed views)."""

    module: nn.Module  # the module its FSDP unit wraps
    flat: nn.Parameter  # this rank's shard, 1-D
    names: tuple[str, ...]  # the parameters inside, relative to `module`, wrapper parts removed
    shapes: tuple[torch.Size, ...]
    requires_grad: tuple[bool, ...]
    pieces: tuple[ShardPiece | None, ...]  # per parameter: its part of this rank's shard, or None
    numels_with_padding: tuple[int, ...]  # the whole flat layout, parameters and padding, in order
    is_padding: tuple[bool, ...]
    local_numel: int  # this rank's shard, padding included; the all-gathered FlatParameter is world_size times it
    world_size: int  # of the shard group; 1 for NO_SHARD, where every rank holds everything
    rank: int
    replicas: int  # copies of the shard group: R of HYBRID_SHARD's (R, S) mesh, else 1
    replica_rank: int  # this rank's row of that mesh
    use_orig_params: bool
    dtype: torch.dtype  # the parameters' own dtype (before mixed precision)


@_door("torch.distributed.fsdp._traversal_utils._get_fsdp_handles / FlatParamHandle._fully_sharded_module",
       "find FSDP1's FlatParameters")  # fmt: skip
def fsdp1_handles(module: nn.Module) -> dict[str, Any]:
    """Each FlatParamHandle under `module`, keyed by the clean name of the module its unit wraps ("" = root)."""
    from torch.distributed.fsdp._traversal_utils import _get_fsdp_handles

    names = {id(m): n for n, m in module.named_modules()}
    return {clean_name(names.get(id(h._fully_sharded_module), "")): h for h in _get_fsdp_handles(module)}


HYBRID_STRATEGIES = ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")  # HandleShardingStrategy names that replicate


def _replicas(handle) -> tuple[int, int]:
    """(R, this rank's row) of a hybrid FlatParameter's (R, S) mesh, which must be row-major over the world."""
    import torch.distributed as dist

    if handle._sharding_strategy.name not in HYBRID_STRATEGIES:
        return 1, 0
    S, rank = handle.world_size, dist.get_rank()
    row = rank // S
    if dist.get_process_group_ranks(handle.process_group) != list(range(row * S, row * S + S)):
        raise NotImplementedError("layout_of: this HSDP shard group is not S consecutive ranks (a row-major mesh)")
    return dist.get_world_size() // S, row


@_door("FlatParameter metadata (_fqns, _shapes, _shard_param_infos, ...)", "read FSDP1's layout")
def flat_info(handle) -> FlatInfo:
    """The metadata of one FlatParamHandle's FlatParameter, as plain values."""
    flat = handle.flat_param
    if handle._use_orig_params:
        grads = tuple(p.requires_grad for p in flat._params)  # the original parameters, metadata only
    else:
        grads = (flat.requires_grad,) * len(flat._fqns)  # uniform, or FSDP1 would have refused
    pieces = tuple(
        ShardPiece(i.offset_in_shard, i.intra_param_start_idx, i.intra_param_end_idx + 1) if i.in_shard else None
        for i in flat._shard_param_infos
    )
    world, rank = (handle.world_size, handle.rank) if handle.uses_sharded_strategy else (1, 0)
    replicas, replica = _replicas(handle)
    return FlatInfo(
        module=handle._fully_sharded_module,
        flat=flat,
        names=tuple(clean_name(n) for n in flat._fqns),
        shapes=tuple(flat._shapes),
        requires_grad=grads,
        pieces=pieces,
        numels_with_padding=tuple(flat._numels_with_padding),
        is_padding=tuple(flat._is_padding_mask),
        local_numel=flat._sharded_size.numel(),
        world_size=world,
        rank=rank,
        replicas=replicas,
        replica_rank=replica,
        use_orig_params=handle._use_orig_params,
        dtype=handle._orig_param_dtype,
    )


def fsdp1_gathered_bytes(handle) -> int:
    """Bytes of the all-gathered FlatParameter buffer alive now (0 while resharded)."""
    flat = handle.flat_param
    if not handle.uses_sharded_strategy:
        return 0  # NO_SHARD gathers nothing
    return flat._full_param_padded.untyped_storage().nbytes()


@_door("FullyShardedDataParallel._handle", "find the root unit of an FSDP1 model")
def fsdp1_root_handle(model: nn.Module):
    """The root FSDP1 unit's FlatParamHandle, or None when the root holds no parameters of its own."""
    return model._handle


def fsdp1_unit_module(state_or_handle) -> nn.Module | None:
    """The module an FSDP1 handle (or an FSDP state, as `_reduce_grad` receives) belongs to."""
    handle = state_or_handle._handle if isinstance(state_or_handle, nn.Module) else state_or_handle
    return handle._fully_sharded_module if handle is not None else None


# ---- FSDP2 ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardedParamInfo:
    """One FSDP2 parameter: its owner and name, its DTensor, and this rank's place in the shard group."""

    module: nn.Module
    param_name: str
    sharded: torch.Tensor  # DTensor, global shape
    shard_dim: int
    shard_rank: int
    shard_world: int
    replicate_rank: int  # this rank's row of an HSDP (R, S) mesh; 0 on a 1-D mesh
    replicate_world: int  # R; 1 on a 1-D mesh
    padded_rows: int  # rows of the all-gather input on every rank (the shard, padded)
    padded_numel: int


@_door("FSDPModule._get_fsdp_state / FSDPState._fsdp_param_group", "find FSDP2's parameter groups")
def fsdp2_group(module: nn.Module):
    """The FSDPParamGroup of a module `fully_shard` was called on, or None if it manages no parameter."""
    return module._get_fsdp_state()._fsdp_param_group


@_door("FSDPParam (_module_info, sharded_param, fsdp_placement, mesh_info, padded_sharded_param_size)",
       "read FSDP2's layout")  # fmt: skip
def fsdp2_params(group) -> list[ShardedParamInfo]:
    """The parameters of one FSDP2 group, in the group's order."""
    out = []
    for fp in group.fsdp_params:
        out.append(
            ShardedParamInfo(
                module=fp._module_info.module,
                param_name=fp._module_info.param_name,
                sharded=fp.sharded_param,
                shard_dim=fp.fsdp_placement.dim,
                shard_rank=fp.mesh_info.shard_mesh_rank,
                shard_world=fp.mesh_info.shard_mesh_size,
                replicate_rank=getattr(fp.mesh_info, "replicate_mesh_rank", 0),  # HSDPMeshInfo only
                replicate_world=getattr(fp.mesh_info, "replicate_mesh_size", 1),
                padded_rows=fp.padded_sharded_param_size[0],
                padded_numel=fp.padded_sharded_param_size.numel(),
            )
        )
    return out


def shard_size_and_offset(size: int, world: int, rank: int) -> tuple[int, int]:
    """(rows, first row) of rank `rank`'s dim-0 shard of `size` rows over `world` ranks, by torch's own
    rule (public since torch 2.10, so not a door of its own: here to keep the layout code torch-agnostic)."""
    from torch.distributed.tensor import Shard

    size, offset = Shard.local_shard_size_and_offset(size, world, rank)
    return int(size), int(offset)


@_door("FSDPParamGroup._module_fqn", "name FSDP2's units on a timeline")
def fsdp2_group_name(group) -> str:
    return clean_name(group._module_fqn or "")


@_door("FSDPParam.all_gather_outputs / FSDPParamGroup._all_gather_result", "sample gathered memory")
def fsdp2_gathered_bytes(group) -> int:
    """Bytes of this group's all-gather outputs alive now, a prefetched gather not yet copied out included."""
    total = sum(out.untyped_storage().nbytes() for fp in group.fsdp_params for out in fp.all_gather_outputs)
    pending = group._all_gather_result
    if pending is not None and pending.all_gather_output is not None:
        total += pending.all_gather_output.untyped_storage().nbytes()
    return total


# ---- timeline entry points -------------------------------------------------------------------


def unit_entry_points(version: int) -> list[tuple[object, str, str]]:
    """(owner, attribute, kind) of the FSDP functions the timeline wraps to name each collective's unit."""
    if version == 2:
        group = resolve("torch.distributed.fsdp._fully_shard._fsdp_param_group.FSDPParamGroup")
        points = [(group, "unshard", "unshard"), (group, "wait_for_unshard", "wait")]
        points.append((group, "post_backward", "post_backward"))
    else:
        handle = resolve("torch.distributed.fsdp._flat_param.FlatParamHandle")
        runtime = resolve("torch.distributed.fsdp._runtime_utils")
        # FSDP1 reduces a unit's gradient in `_runtime_utils._reduce_grad(state, handle)`, a module function
        points = [(handle, "unshard", "unshard"), (runtime, "_reduce_grad", "post_backward")]
    for owner, attr, _ in points:
        if not callable(getattr(owner, attr, None)):
            where = f"{getattr(owner, '__name__', owner)}.{attr}"
            raise _missing(where, "time FSDP's collectives", AttributeError(attr))
    return points


# torch.distributed's collectives -> span kind: the names FSDP1 and FSDP2 call, across releases
# (2.11 calls all_gather_into_tensor and reduce_scatter_tensor, 2.13 the newer *_single names;
# the underscored ones are deprecated spellings that forward to them).
COLLECTIVES = {
    "all_gather": "all_gather",
    "all_gather_single": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "_all_gather_base": "all_gather",
    "reduce_scatter_single": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter",
    "all_reduce": "all_reduce",
}


def collective_functions() -> list[tuple[object, str, str]]:
    """(namespace, name, kind) of each collective this torch has, in `torch.distributed` and the
    module FSDP may call it through; refuses when some kind has none (the lane would stay empty)."""
    import torch.distributed as dist

    found = [
        (namespace, name, kind)
        for namespace in (dist, dist.distributed_c10d)
        for name, kind in COLLECTIVES.items()
        if callable(getattr(namespace, name, None))
    ]
    for kind in set(COLLECTIVES.values()) - {k for *_, k in found}:
        names = ", ".join(n for n, k in COLLECTIVES.items() if k == kind)
        raise _missing(f"torch.distributed's {kind} ({names})", "time collectives", AttributeError(kind))
    return found


# DTensor's functional collectives -> span kind. DTensor (TP's redistributions) calls them as
# `funcol.all_reduce(...)`, looked up at call time from the module: 2.13 calls the *_single names,
# older releases the *_tensor ones (deprecated in 2.13, forwarding to *_single). Each returns an
# AsyncCollectiveTensor at once and the rank blocks in `wait_tensor` when the result is first used.
# DTensor's Shard(i) -> Shard(j) all-to-all goes through a dispatcher op instead (not seen here);
# colwise and rowwise plans never run it.
FUNCTIONAL_MODULE = "torch.distributed._functional_collectives"
FUNCTIONAL_COLLECTIVES = {
    "all_reduce": "all_reduce",
    "all_gather_single": "all_gather",
    "all_gather_tensor": "all_gather",
    "reduce_scatter_single": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
}


def functional_collective_functions() -> tuple[object, list[tuple[str, str]]]:
    """(the functional collectives' module, [(name, kind)] of each collective it has); refuses when some kind,
    or `wait_tensor`, is missing (tensor parallelism's lanes would stay empty)."""
    module = resolve(FUNCTIONAL_MODULE)
    found = [(name, kind) for name, kind in FUNCTIONAL_COLLECTIVES.items() if callable(getattr(module, name, None))]
    for kind in set(FUNCTIONAL_COLLECTIVES.values()) - {k for _, k in found}:
        names = ", ".join(n for n, k in FUNCTIONAL_COLLECTIVES.items() if k == kind)
        raise _missing(f"{FUNCTIONAL_MODULE}'s {kind} ({names})", "time TP's collectives", AttributeError(kind))
    if not callable(getattr(module, "wait_tensor", None)):
        raise _missing(f"{FUNCTIONAL_MODULE}.wait_tensor", "time TP's collectives", AttributeError("wait_tensor"))
    async_type = _async_collective_tensor()  # what `functional_pending` reads, checked before any step runs
    for attr in ("elem", "completed"):
        if not hasattr(async_type, attr) and attr not in getattr(async_type, "__annotations__", {}):
            raise _missing(f"AsyncCollectiveTensor.{attr}", "time TP's collectives", AttributeError(attr))
    return module, found


@functools.cache
def _async_collective_tensor() -> type:
    return resolve(f"{FUNCTIONAL_MODULE}.AsyncCollectiveTensor")  # once: this is asked on every collective


@_door("AsyncCollectiveTensor.elem / .completed", "time TP's collectives")
def functional_pending(result) -> torch.Tensor | None:
    """The tensor a later `wait_tensor` receives for a functional collective's `result`, or None when the
    collective already waited (a gather along dim > 0 waits inside the call; tracing waits at once)."""
    async_type = _async_collective_tensor()
    return result.elem if isinstance(result, async_type) and not result.completed else None


def in_backward() -> bool:
    """True while autograd runs a backward pass on this thread."""
    return torch._C._current_graph_task_id() != -1


# ---- wrapping ------------------------------------------------------------------------------


def checkpoint_wrapper(module: nn.Module) -> nn.Module:
    """torch's non-reentrant activation-checkpointing wrapper (what Accelerate applies), from its private home."""
    fn = resolve("torch.distributed.algorithms._checkpoint.checkpoint_wrapper.checkpoint_wrapper")
    return fn(module)


def is_torch_wrap_policy(policy: object) -> bool:
    """A torch wrap-policy object (`ModuleWrapPolicy`, `CustomPolicy`): it answers `_run_policy`."""
    return callable(getattr(policy, "_run_policy", None))


@_door("torch.distributed.fsdp.wrap._Policy._run_policy", "ask a torch wrap policy for its units")
def run_wrap_policy(policy, model: nn.Module) -> list[nn.Module]:
    """The modules a torch wrap-policy object picks in `model` (the root excluded by the caller)."""
    return list(policy._run_policy(model, set(), {}))


# ---- FSDP1 sharded tensors -----------------------------------------------------------------


def is_sharded_tensor(obj: object) -> bool:
    """FSDP1's sharded state dicts hold ShardedTensors (deprecated by torch, still what FSDP1 returns)."""
    return hasattr(obj, "local_shards") and hasattr(obj, "metadata")


def sharded_tensor_like(obj, local_tensors: list[torch.Tensor]):
    """A ShardedTensor with `obj`'s global metadata around `local_tensors` (one per local shard)."""
    module = resolve("torch.distributed._shard.sharded_tensor")
    shards = [module.Shard(t, s.metadata) for t, s in zip(local_tensors, obj.local_shards())]
    build = resolve("torch.distributed._shard.sharded_tensor.ShardedTensor._init_from_local_shards_and_global_metadata")
    return build(shards, obj.metadata())


# ---- DTensor's log -------------------------------------------------------------------------

REDISTRIBUTE_LOGGER = "torch.distributed.tensor._redistribute"  # the module whose `logger` the Symbol names


def redistribute_logger() -> logging.Logger:
    """The logger through which DTensor says, once per mesh and process, that gathering a parameter
    sharded over (dp_shard, tp) takes two all-gathers. By name, so a torch that moved the module costs
    only a notice shown again (`tests/test_torch_internals.py` checks that the name still holds)."""
    return logging.getLogger(REDISTRIBUTE_LOGGER)
