"""`shard(model, config)`: apply FSDP1 or FSDP2 to a model, in a fixed order.

The recipe, and why the order matters:
1. `wrap_units` decides which submodules become their own FSDP unit (one
   all-gather per unit). It only reads the model, so a wrong class name fails
   before any communication.
2. `apply_activation_checkpointing` wraps those same units, so a unit's
   activations are recomputed inside the unit whose parameters are gathered.
3. `_apply_fsdp1` / `_apply_fsdp2` shard the units bottom-up, then the root,
   over the mesh of `fsdp_nb.mesh` (1-D, or 2-D (replicate, shard) for hybrid
   sharding). The root keeps whatever no unit claimed: embeddings, final norm, head.

CPU notes, handled here so notebooks on a laptop just work:
- FSDP1 needs `device_id=torch.device("cpu")` on gloo.
- FSDP1 `sync_module_states=True` refuses CPU tensors; on CPU we broadcast
  rank 0's parameters and buffers ourselves before wrapping.
- FSDP2's `CPUOffloadPolicy` pins memory by default, which needs CUDA.

An optimizer built before `shard()` is refused at `step()`: see optim_guard.py.
"""

from __future__ import annotations

import re
import warnings
import weakref
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from fsdp_nb._torch import checkpoint_wrapper, is_torch_wrap_policy, run_wrap_policy
from fsdp_nb.hf.detect import causal_lm
from fsdp_nb.loading import (
    broadcast_from_rank0,
    fill_from_rank0,
    fill_fsdp1_from_rank0,
    has_meta,
    materialize,
    rank0_state,
    tie_keeping_init,
)
from fsdp_nb.loading import build_on_rank0 as build_on_rank0  # its public path since the first release
from fsdp_nb.mesh import build_mesh, data_parallel_mesh, fsdp1_group_args, plan_for, tp_mesh
from fsdp_nb.optim_guard import remember_replaced
from fsdp_nb.phases import fail_together

if TYPE_CHECKING:
    from fsdp_nb.config import FSDPConfig
    from fsdp_nb.parallelism import MeshPlan

WRAP_POLICIES = ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP")
_CONFIGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # sharded model -> the FSDPConfig used


def fsdp_version_of(model: nn.Module) -> int:
    """1 for an FSDP1 wrapper, 2 for an FSDP2 module, 0 for anything else (plain, DDP)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return 1 if isinstance(model, FSDP) else 2 if isinstance(model, FSDPModule) else 0


def config_of(model: nn.Module) -> FSDPConfig | None:
    """The `FSDPConfig` that `shard()` applied to `model`, or None (sharded by hand, or not sharded)."""
    return _CONFIGS.get(model)


def shard(
    model: nn.Module, config: FSDPConfig, *, mesh: Any = None, tp_plan: dict[str, str] | None = None
) -> nn.Module:
    """Shard `model` across the current process group as `config` (an `FSDPConfig`) says.

    Returns the sharded model: an FSDP1 `FullyShardedDataParallel` wrapper, or
    for FSDP2 the same module object, now an `FSDPModule` with DTensor
    parameters. Build the optimizer from the returned model's parameters.
    `mesh` (a DeviceMesh, 1-D or 2-D (replicate, shard)) wins over the config's
    mesh sizes left at their defaults; one that contradicts a size set is an error.
    """
    if not dist.is_initialized():
        raise RuntimeError(
            "shard() needs an initialised process group: run it on the ranks of an "
            "fsdp_nb Session (%%fsdp cell) or under torchrun"
        )
    # Everything up to the first collective is local, and may fail on some ranks only (a
    # class name, a meta tensor, a torch refusal): the ranks agree on the outcome before any
    # of them broadcasts [Note: fail together].
    with fail_together("shard()"):
        plan = plan_for(config, mesh)  # the sizes against the world, or the given mesh [Note: mesh sizes]
        tp_modules = _tp_modules(model, config, plan, tp_plan)  # 0. what TP splits, before units rename modules
        before = list(model.parameters())  # a tied parameter is listed once
        units = wrap_units(model, config)  # 1. which submodules get their own unit
        units = apply_activation_checkpointing(model, units, config)  # 2. recompute per unit
    if plan.note:  # FSDP1's hybrid strategy on one machine: it runs as FULL_SHARD
        warnings.warn(plan.note, UserWarning, stacklevel=2)
    mesh = build_mesh(plan, compute_device().type, mesh)  # a collective for a 2-D mesh: every rank is here
    if tp_modules:  # TP first: fully_shard then shards the TP DTensors over the data-parallel dims
        from fsdp_nb.tensor_parallel import apply_plan

        apply_plan(tp_modules, tp_mesh(mesh))  # a collective (rank 0's weights are scattered)
    if config.fsdp_version == 1:  # 3. shard units, then the root
        sharded = _apply_fsdp1(model, units, config, plan, mesh)
    else:
        sharded = _apply_fsdp2(model, units, config, data_parallel_mesh(mesh) if mesh is not None else None)
    remember_replaced(before, sharded)
    _CONFIGS[sharded] = config
    return sharded


def _tp_modules(model: nn.Module, config: FSDPConfig, plan: MeshPlan, tp_plan: dict | None) -> list:
    """The modules TP splits, checked; [] without TP. A plan without tp_size > 1 is refused."""
    from fsdp_nb.tensor_parallel import plan_of, resolve_plan

    if plan.tp == 1:
        if tp_plan is not None:
            raise ValueError("tp_plan= needs tp_size > 1 in the config; accepted: tp_size=2 or more, or no tp_plan")
        return []
    if config.cpu_ram_efficient_loading:
        raise ValueError(
            f"cpu_ram_efficient_loading=True with tp_size={plan.tp} is not supported; use cpu_ram_efficient_loading"
            "=False (each rank builds the model) or tp_size=1"
        )
    return resolve_plan(model, plan_of(model, tp_plan), plan.tp)


# ---- 1. wrap units -------------------------------------------------------------


def wrap_units(model: nn.Module, config: FSDPConfig) -> list[nn.Module]:
    """Submodules that become their own FSDP unit, children before parents.

    TRANSFORMER_BASED_WRAP picks modules whose class name is listed in
    `transformer_cls_names_to_wrap` (default: the model's `_no_split_modules`).
    SIZE_BASED_WRAP picks, bottom-up, modules holding at least `min_num_params`
    parameters not already claimed by a smaller unit. NO_WRAP picks none. A
    torch policy object (`ModuleWrapPolicy`, `CustomPolicy`) or an FSDP1 policy
    function `fn(module, recurse, nonwrapped_numel) -> bool` is asked the same
    way FSDP1 asks it. A unit that would split a tied parameter from its other
    owner is dropped, so the tied parameter stays in the root's group.
    """
    policy = config.auto_wrap_policy
    # every submodule, children first, minus the root (last) and containers: a
    # ModuleList never runs forward, so FSDP's hooks on it would never fire
    modules = [m for m in _post_order(model)[:-1] if not isinstance(m, (nn.ModuleList, nn.ModuleDict))]
    if policy == "NO_WRAP" or policy is None:
        return []
    if policy == "TRANSFORMER_BASED_WRAP":
        names = list(config.transformer_cls_names_to_wrap or getattr(model, "_no_split_modules", None) or [])
        present = sorted({type(m).__name__ for m in model.modules()})
        missing = [n for n in names if n not in present]
        if missing:
            raise ValueError(
                f"auto_wrap_policy='TRANSFORMER_BASED_WRAP': transformer_cls_names_to_wrap="
                f"{names!r} names {missing}, which {type(model).__name__} does not contain; its classes are {present}"
            )
        if not names:  # as Accelerate does for a model that names no block class
            warnings.warn(
                f"auto_wrap_policy='TRANSFORMER_BASED_WRAP': {type(model).__name__} has no _no_split_modules and "
                f"no transformer_cls_names_to_wrap was given, so units are chosen by size (SIZE_BASED_WRAP, "
                f"min_num_params={config.min_num_params:,}); name the block class to wrap one unit per block",
                UserWarning,
                stacklevel=3,
            )
            policy = "SIZE_BASED_WRAP"
    if policy == "TRANSFORMER_BASED_WRAP":
        units = [m for m in modules if type(m).__name__ in names]
    elif policy == "SIZE_BASED_WRAP":
        units = _ask_fsdp1_policy(
            modules, lambda module, recurse, nonwrapped_numel: nonwrapped_numel >= config.min_num_params
        )
    elif is_torch_wrap_policy(policy):  # torch's ModuleWrapPolicy / CustomPolicy objects
        chosen = {id(m) for m in run_wrap_policy(policy, model)}
        units = [m for m in modules if id(m) in chosen]
    elif callable(policy):
        units = _ask_fsdp1_policy(modules, policy)
    else:
        raise ValueError(f"auto_wrap_policy={policy!r}: use one of {WRAP_POLICIES} or a torch wrap policy")
    return [u for u in units if not _splits_a_tie(model, u)]


def _ask_fsdp1_policy(modules: list[nn.Module], policy: Any) -> list[nn.Module]:
    """FSDP1's bottom-up rule: a module is a unit if the policy accepts the count of
    its parameters that no smaller unit has claimed yet."""
    units, claimed = [], set()
    for m in modules:
        free = [p for p in m.parameters() if id(p) not in claimed]
        if policy(module=m, recurse=False, nonwrapped_numel=sum(p.numel() for p in free)):
            units.append(m)
            claimed.update(id(p) for p in free)
    return units


def _post_order(module: nn.Module) -> list[nn.Module]:
    out = []
    for child in module.children():
        out.extend(_post_order(child))
    return out + [module]


def _splits_a_tie(model: nn.Module, unit: nn.Module) -> bool:
    """True if `unit` holds a parameter that some module outside `unit` also holds."""
    inside = {id(m) for m in unit.modules()}
    owners: dict[int, set[int]] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(m))
    return any(not owners[id(p)] <= inside for p in unit.parameters())


# ---- 2. activation checkpointing -------------------------------------------------


def apply_activation_checkpointing(model: nn.Module, units: list[nn.Module], config: FSDPConfig) -> list[nn.Module]:
    """Replace each unit by a `checkpoint_wrapper` of it when `activation_checkpointing`
    is on; returns the (possibly wrapped) units, which are what gets sharded."""
    hf = causal_lm(model)
    if config.activation_checkpointing and hf is not None and _hf_checkpointing(hf):
        off = "activation" if hasattr(hf, "activation_checkpointing_disable") else "gradient"  # renamed in 5.x
        raise ValueError(
            "activation_checkpointing=True, and Hugging Face's own checkpointing is on too: each layer would be "
            f"recomputed twice. Keep one switch: call model.{off}_checkpointing_disable() and keep "
            "activation_checkpointing=True, which checkpoints exactly the FSDP units"
        )
    if not config.activation_checkpointing:
        return units
    if not units:
        raise ValueError(
            "activation_checkpointing=True needs wrap units to checkpoint; "
            f"auto_wrap_policy={config.auto_wrap_policy!r} selected none"
        )
    parent_of = {id(child): (parent, name) for parent in model.modules() for name, child in parent.named_children()}
    wrapped = []
    for unit in units:
        parent, name = parent_of[id(unit)]
        wrapper = checkpoint_wrapper(unit)  # non-reentrant: works with FSDP's hooks
        setattr(parent, name, wrapper)
        parent_of.update({id(c): (wrapper, n) for n, c in wrapper.named_children()})
        wrapped.append(wrapper)
    return wrapped


def _hf_checkpointing(hf: nn.Module) -> bool:
    """Whether `gradient_checkpointing_enable()` (`activation_checkpointing_enable()` in later 5.x) is on."""
    name = (
        "is_activation_checkpointing"
        if hasattr(type(hf), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    return bool(getattr(hf, name, False))


# ---- 3. sharding -------------------------------------------------------------------


def _dtypes(config: FSDPConfig) -> tuple[torch.dtype, torch.dtype] | None:
    """`(param_dtype, reduce_dtype)` from `config.mixed_precision`, or None for full fp32.

    The presets "bf16"/"fp16" compute in that dtype and reduce gradients in fp32,
    so the averaged gradient keeps full precision."""
    mp = config.mixed_precision
    return None if mp is None else (mp.param_dtype, mp.reduce_dtype)


def compute_device() -> torch.device:
    """The device this rank computes on: the current CUDA device under nccl, else CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _apply_fsdp1(model: nn.Module, units: list[nn.Module], config: FSDPConfig, plan: MeshPlan, mesh) -> nn.Module:
    from torch.distributed.fsdp import BackwardPrefetch, CPUOffload, MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import CustomPolicy

    device = compute_device()
    loading = config.cpu_ram_efficient_loading
    full_state = rank0_state(model) if loading else None
    sync = config.sync_module_states and not loading  # loading broadcasts rank 0's weights after wrapping
    if sync and device.type == "cpu":
        broadcast_from_rank0(model)  # FSDP1's own sync refuses CPU tensors
        sync = False
    if config.cpu_offload and device.type == "cpu":
        warnings.warn(
            "cpu_offload=True is ignored with FSDP1 on CPU: the parameters already live in "
            "CPU memory, and FSDP1's offload path needs CUDA",
            UserWarning,
            stacklevel=3,
        )
    dtypes = _dtypes(config)
    mp = MixedPrecision(param_dtype=dtypes[0], reduce_dtype=dtypes[1], buffer_dtype=dtypes[0]) if dtypes else None
    unit_ids = {id(u) for u in units}
    strategy, prefetch = plan.strategy, config.backward_prefetch  # the plan's: HYBRID_SHARD with R = 1 is FULL_SHARD
    # On CPU wrapping is local (sync is ours, done above). On CUDA, FSDP1's own sync broadcasts
    # inside the constructor, so a rank that fails before it leaves the others in that broadcast.
    with fail_together("shard()"):
        wrapped = _fsdp1_wrap(
            FSDP,
            model,
            device_id=device,
            auto_wrap_policy=CustomPolicy(lambda m: id(m) in unit_ids) if units else None,
            # torch spells HYBRID_SHARD_ZERO2 with a leading underscore
            sharding_strategy=ShardingStrategy[
                strategy if strategy in ShardingStrategy.__members__ else "_" + strategy
            ],
            backward_prefetch=BackwardPrefetch[prefetch] if prefetch else None,
            forward_prefetch=config.forward_prefetch,
            mixed_precision=mp,
            cpu_offload=CPUOffload(offload_params=config.cpu_offload and device.type != "cpu"),
            use_orig_params=config.use_orig_params,
            sync_module_states=sync,
            ignored_modules=_ignored_modules(model, config),
            # ranks != 0 under cpu_ram_efficient_loading: one unit at a time gets (empty) storage
            param_init_fn=tie_keeping_init(device) if has_meta(model) else None,
            **fsdp1_group_args(plan, mesh),  # hybrid: rows of the (R, S) mesh shard, its columns replicate
        )
    if loading:
        fill_fsdp1_from_rank0(wrapped, full_state)
    return wrapped


def _fsdp1_wrap(FSDP, model: nn.Module, *, use_orig_params: bool, **kwargs) -> nn.Module:  # noqa: N803
    """`FSDP(model, ...)`, with the refusal users meet most often (frozen and trainable parameters in
    one FlatParameter) said in their terms."""
    try:
        return FSDP(model, use_orig_params=use_orig_params, **kwargs)
    except ValueError as err:
        if "requires_grad" in str(err) and not use_orig_params:
            raise ValueError(
                "FSDP1 with use_orig_params=False flattens each unit's parameters into one "
                "FlatParameter, which has a single requires_grad flag, so a unit cannot mix "
                "frozen and trainable parameters. Use use_orig_params=True, or FSDP2 "
                "(fsdp_version=2), which keeps one DTensor per parameter."
            ) from err  # torch's error stays the cause: the short form shows its line, %fsdp_tb its frames
        raise


def _apply_fsdp2(model: nn.Module, units: list[nn.Module], config: FSDPConfig, mesh: Any) -> nn.Module:
    """`fully_shard` bottom-up over `mesh`: 1-D shards each parameter's rows over all its ranks; 2-D
    (replicate, shard) is HSDP, each parameter `(Replicate(), Shard(0))`, rows split along a mesh row."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    device = compute_device()
    dtypes = _dtypes(config)
    with fail_together("shard()"):
        ignored = {p for m in _ignored_modules(model, config) for p in m.parameters()}
    kwargs = dict(
        mesh=mesh,
        reshard_after_forward=config.reshard_after_forward,
        mp_policy=MixedPrecisionPolicy(param_dtype=dtypes[0], reduce_dtype=dtypes[1])
        if dtypes
        else MixedPrecisionPolicy(),
        # pinned host memory needs CUDA; without it the offload still works, unpinned
        offload_policy=CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        if config.cpu_offload
        else OffloadPolicy(),
        ignored_params=ignored or None,
    )
    loading = config.cpu_ram_efficient_loading
    full_state = rank0_state(model) if loading else None
    with fail_together("shard()"):  # fully_shard is local: no collective until the first forward
        for unit in units:  # bottom-up: a unit's parameters leave the root's group
            fully_shard(unit, **kwargs)
        # The root: everything no unit claimed (tied embeddings too). Its backward starts the moment its
        # forward ends (the head's gradient comes first), so resharding it after forward only to gather
        # it again at once is pure cost: with reshard_after_forward=True the root gets torch's root
        # default (None: kept gathered), as torch itself does when the option is left out.
        root_reshard = None if kwargs["reshard_after_forward"] is True else kwargs["reshard_after_forward"]
        fully_shard(model, **{**kwargs, "reshard_after_forward": root_reshard})
        if loading:  # ranks != 0 hold meta shards: allocate them (shards only)
            materialize(model, device)
    if loading:  # then scatter rank 0's weights
        fill_from_rank0(model, full_state)
    if config.forward_prefetch:
        # each unit starts the all-gather of the next one before its own forward runs
        for current, following in zip(units, units[1:]):
            current.set_modules_to_forward_prefetch([following])
    return model


def _ignored_modules(model: nn.Module, config: FSDPConfig) -> list[nn.Module]:
    """Submodules whose qualified name fully matches one of `ignored_modules`."""
    patterns = [re.compile(p) for p in config.ignored_modules or ()]
    found = [m for name, m in model.named_modules() if name and any(p.fullmatch(name) for p in patterns)]
    if patterns and not found:
        raise ValueError(f"ignored_modules={config.ignored_modules!r} matches no submodule of {type(model).__name__}")
    return found
