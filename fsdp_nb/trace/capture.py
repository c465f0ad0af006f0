"""Recording one rank's spans while FSDP1 or FSDP2 runs a training step (rank side).

What torch 2.13 gives us, read before writing anything here: FSDP2 wraps its phases in
`record_function` ranges (`FSDP::all_gather (blocks.0)`), FSDP1 in unlabelled ones,
and on CPU both go through the `torch.profiler`, which costs 25-110% of a step to
collect and several steps to read. So the recorder hooks the few places that matter
and costs about 1%:
- unit forward: global module forward pre/post hooks, kept for FSDP units only
  (the FSDP1 wrapper; the FSDP2 module), so the span includes the unit's all-gather;
- unit backward: from the first gradient reaching the unit's output to the moment
  FSDP runs its post-backward for that unit (the reduce-scatter comes after);
- collectives: `torch.distributed`'s all-gather / reduce-scatter / all-reduce
  functions, which FSDP looks up at call time (gloo runs them synchronously on
  CPU, so a call's duration is the rank's time in it);
- which unit a collective belongs to: FSDP2's `FSDPParamGroup.unshard` /
  `post_backward`, FSDP1's `FlatParamHandle.unshard` / `_reduce_grad`;
- waits: FSDP2's `wait_for_unshard`, where a unit waits for its gather and copies
  it out into the parameters (on CPU gloo the gather is already done: the copy);
- the optimizer: global optimizer step pre/post hooks;
- unsharded bytes: the storage of FSDP2's all-gather outputs and FSDP1's
  `_full_param_padded`, sampled at every span boundary.
Everything is installed for the traced steps only and removed afterwards, so a
model that is not being traced runs exactly the code it ran before.
"""

from __future__ import annotations

import threading
import time

import torch
import torch.distributed as dist
from torch import nn

from fsdp_nb.trace.spans import Span

_COLLECTIVES = {  # torch.distributed function -> span kind (the names FSDP1 and FSDP2 call on CPU)
    "all_gather": "all_gather",
    "all_gather_single": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "_all_gather_base": "all_gather",
    "reduce_scatter_single": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter",
    "all_reduce": "all_reduce",
}


def _now() -> float:
    return time.perf_counter_ns() * 1e-9


class Recorder:
    """Hooks a rank's FSDP units, collectives and optimizer; `with Recorder(model):` records."""

    def __init__(self, model: nn.Module):
        from fsdp_nb.sharding import fsdp_version_of

        self.model, self.version = model, fsdp_version_of(model)
        if self.version == 0:
            raise ValueError(f"trace: {type(model).__name__} is not sharded by FSDP1 or FSDP2; pass the sharded model")
        self.units, self.owners = _units(model, self.version)  # id(module) -> clean name; "" is the root
        self.probes = _memory_probes(model, self.version)
        self.spans: list[Span] = []
        self.memory: list[tuple[float, int]] = []
        self.steps: list[tuple[float, float]] = []
        self.step = 0
        self._open: dict[tuple[str, str], float] = {}
        self._current_unit = threading.local()
        self._in_optimizer = False
        self._forward_depth = 0  # > 0 inside some unit's forward
        self._calls = threading.local()  # per thread: inside a collective (a deprecated name forwarding)
        self._thread = threading.get_ident()  # the training thread: others (a background save) are not traced
        self._undo: list = []

    # ---- install / remove ----------------------------------------------------------
    def __enter__(self) -> Recorder:
        try:
            self._install()
        except BaseException:
            self.__exit__()  # whatever was installed before the failure comes off again
            raise
        return self

    def _install(self) -> None:
        from torch.nn.modules import module as module_hooks
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._undo.append(module_hooks.register_module_forward_pre_hook(self._forward_pre).remove)
        self._undo.append(module_hooks.register_module_forward_hook(self._forward_post).remove)
        self._undo.append(register_optimizer_step_pre_hook(self._optimizer_pre).remove)
        self._undo.append(register_optimizer_step_post_hook(self._optimizer_post).remove)
        for namespace in (dist, dist.distributed_c10d):
            for name, kind in _COLLECTIVES.items():
                if hasattr(namespace, name):
                    self._patch(namespace, name, self._collective(getattr(namespace, name), kind))
        for owner, method, kind in _unit_entry_points(self.version):
            self._patch(owner, method, self._naming(getattr(owner, method), kind))

    def __exit__(self, *exc) -> None:
        """Remove every hook and patch, last installed first."""
        while self._undo:
            self._undo.pop()()

    def _patch(self, owner, name: str, replacement) -> None:
        original = owner.__dict__[name] if name in owner.__dict__ else getattr(owner, name)
        setattr(owner, name, replacement)
        self._undo.append(lambda: setattr(owner, name, original))

    # ---- steps -----------------------------------------------------------------------
    def run_step(self, fn) -> object:
        start = _now()
        self.sample(start)
        try:
            return fn()
        finally:
            end = _now()
            self.sample(end)
            self.steps.append((start, end))
            self.step += 1

    def sample(self, t: float | None = None) -> None:
        self.memory.append((_now() if t is None else t, sum(probe() for probe in self.probes)))

    def _add(self, kind: str, unit: str, start: float, end: float, phase: str = "") -> None:
        self.spans.append(Span(kind, unit, start, end, phase, self.step))
        self.sample(end)

    # ---- hooks ---------------------------------------------------------------------------
    def _forward_pre(self, module, args):
        name = self.units.get(id(module))
        if name is not None:
            self._open[("forward", name)] = _now()
            self._forward_depth += 1
            self.sample()

    def _forward_post(self, module, args, output):
        name = self.units.get(id(module))
        if name is None or ("forward", name) not in self._open:
            return
        self._forward_depth -= 1
        self._add("forward", name, self._open.pop(("forward", name)), _now())
        if torch.is_grad_enabled():  # the first gradient to reach this unit's output starts its backward
            started = []

            def on_grad(grad, name=name, started=started):
                if not started:
                    started.append(True)
                    self._open[("backward", name)] = _now()
                    self.sample()

            for t in _tensors(output):
                if t.requires_grad:
                    t.register_hook(on_grad)

    def _optimizer_pre(self, optimizer, args, kwargs):
        self._in_optimizer = True
        self._open[("optimizer", "")] = _now()

    def _optimizer_post(self, optimizer, args, kwargs):
        self._in_optimizer = False
        if ("optimizer", "") in self._open:
            self._add("optimizer", "", self._open.pop(("optimizer", "")), _now())

    def _phase(self) -> str:
        """Where in the step a collective runs: "forward", "backward", "optimizer", or "step" (the rest:
        a loss averaged over ranks, a gradient norm)."""
        if self._in_optimizer:
            return "optimizer"
        if torch._C._current_graph_task_id() != -1:
            return "backward"
        return "forward" if self._forward_depth > 0 else "step"

    def _collective(self, fn, kind: str):
        def traced(*args, **kwargs):
            # Count once (a deprecated name forwards to a newer one), and only the training thread's:
            # a background checkpoint writes on its own group from its own thread.
            if getattr(self._calls, "inside", False) or threading.get_ident() != self._thread:
                return fn(*args, **kwargs)
            self._calls.inside = True
            start = _now()
            try:
                return fn(*args, **kwargs)
            finally:
                self._calls.inside = False
                self._add(kind, getattr(self._current_unit, "name", ""), start, _now(), self._phase())

        return traced

    def _naming(self, method, kind: str):
        """Wrap an FSDP entry point so collectives inside it carry its unit's name;
        a unit's post-backward also ends that unit's backward span."""
        recorder = self

        def named(obj, *args, **kwargs):
            name = recorder._unit_of(obj)
            if kind == "post_backward" and ("backward", name) in recorder._open:
                recorder._add("backward", name, recorder._open.pop(("backward", name)), _now())
            previous = getattr(recorder._current_unit, "name", "")
            recorder._current_unit.name = name
            start = _now()
            try:
                return method(obj, *args, **kwargs)
            finally:
                recorder._current_unit.name = previous
                if kind == "wait":  # FSDP2 waiting for a gather and copying it out into the parameters
                    recorder._add("wait", name, start, _now(), recorder._phase())
                else:
                    recorder.sample()  # the gathered buffer exists only once the entry point returns

        return named

    def _unit_of(self, obj) -> str:
        if hasattr(obj, "_module_fqn"):  # FSDP2's FSDPParamGroup
            return _clean(obj._module_fqn or "")
        handle = getattr(obj, "_handle", obj)  # FSDP1: the FSDP state (for _reduce_grad) or the handle
        return self.owners.get(id(getattr(handle, "_fully_sharded_module", None)), "")


# ---- what to hook -----------------------------------------------------------------------
def _clean(name: str) -> str:
    for wrapper in ("_fsdp_wrapped_module", "_checkpoint_wrapped_module"):
        name = name.replace(wrapper + ".", "").replace(wrapper, "")
    return name.strip(".")


def _units(model: nn.Module, version: int) -> tuple[dict[int, str], dict[int, str]]:
    """Two maps to unit names: the modules whose forward is the unit's (FSDP1: the FSDP wrappers;
    FSDP2: the modules `fully_shard` was called on), and the modules FSDP's handles point at."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    units, owners = {}, {}
    for name, module in model.named_modules():
        if version == 1 and isinstance(module, FSDP):
            units[id(module)] = owners[id(module.module)] = _clean(name)
        elif version == 2 and isinstance(module, FSDPModule):
            units[id(module)] = owners[id(module)] = _clean(name)
    return units, owners


def _unit_entry_points(version: int) -> list[tuple[object, str, str]]:
    if version == 2:
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

        return [
            (FSDPParamGroup, "unshard", "unshard"),
            (FSDPParamGroup, "wait_for_unshard", "wait"),
            (FSDPParamGroup, "post_backward", "post_backward"),
        ]
    from torch.distributed.fsdp import _runtime_utils
    from torch.distributed.fsdp._flat_param import FlatParamHandle

    # FSDP1 reduces a unit's gradient in `_runtime_utils._reduce_grad(state, handle)`, a module function
    return [(FlatParamHandle, "unshard", "unshard"), (_runtime_utils, "_reduce_grad", "post_backward")]


def _memory_probes(model: nn.Module, version: int) -> list:
    """Functions returning the bytes of unsharded parameter storage alive now, one per unit."""
    probes = []
    if version == 2:
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                group = module._get_fsdp_state()._fsdp_param_group
                if group is not None:
                    probes.append(lambda g=group: _fsdp2_bytes(g))
    else:
        from torch.distributed.fsdp._traversal_utils import _get_fsdp_handles

        for handle in _get_fsdp_handles(model):
            flat = handle.flat_param
            if hasattr(flat, "_full_param_padded"):
                probes.append(lambda f=flat: f._full_param_padded.untyped_storage().nbytes())
    return probes


def _fsdp2_bytes(group) -> int:
    total = 0
    for fsdp_param in group.fsdp_params:
        for out in getattr(fsdp_param, "all_gather_outputs", None) or ():
            total += out.untyped_storage().nbytes()
    pending = getattr(group, "_all_gather_result", None)  # a prefetched gather not yet copied out
    if pending is not None and getattr(pending, "all_gather_output", None) is not None:
        total += pending.all_gather_output.untyped_storage().nbytes()
    return total


def _tensors(output) -> list[torch.Tensor]:
    if torch.is_tensor(output):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in _tensors(item)]
    return []
