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
- hybrid sharding's all-reduce across replicas: an `all_reduce` inside a unit's post-backward
  is HSDP's (FSDP2's `foreach_reduce` on the replicate group, FSDP1's `_reduce_grad` on the
  inter-node group, each right after the unit's reduce-scatter, both through plain
  `dist.all_reduce`, not functional collectives); it is recorded as "replica_all_reduce",
  apart from the step's own all-reduces (the averaged loss, the gradient norm);
- tensor parallelism's collectives: DTensor calls the functional collectives, not
  `torch.distributed`'s; `tp_collectives` wraps them and their `wait_tensor`, and records
  those inside a unit's forward or backward as "tp_all_reduce", "tp_all_gather", ...;
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
from torch import nn

from fsdp_nb._torch import (
    clean_name,
    collective_functions,
    fsdp1_gathered_bytes,
    fsdp1_handles,
    fsdp1_unit_module,
    fsdp2_gathered_bytes,
    fsdp2_group,
    fsdp2_group_name,
    in_backward,
    unit_entry_points,
)
from fsdp_nb.trace.spans import Span
from fsdp_nb.trace.tp_collectives import FunctionalCollectives


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
        # Everything the recorder needs from torch's internals is looked up now: a missing name
        # refuses the trace, naming it, instead of drawing empty lanes later.
        self.entry_points = unit_entry_points(self.version)
        self.collectives = collective_functions()
        self.functional = FunctionalCollectives(self, clock=_now)  # TP: DTensor's functional collectives
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
        self._in_step = False  # collectives between steps (the clock's barrier) belong to no step
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
        for namespace, name, kind in self.collectives:
            self._patch(namespace, name, self._collective(getattr(namespace, name), kind))
        self.functional.install(self._patch)
        for owner, method, kind in self.entry_points:
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
        self._in_step = True
        try:
            return fn()
        finally:
            self._in_step = False
            self.functional.flush()
            end = _now()
            self.sample(end)
            self.steps.append((start, end))
            self.step += 1

    def sample(self, t: float | None = None) -> None:
        self.memory.append((_now() if t is None else t, sum(probe() for probe in self.probes)))

    def _add(self, kind: str, unit: str, start: float, end: float, phase: str = "", sent=None, sample=True) -> None:
        dtype, nbytes = ("", 0) if sent is None else (str(sent.dtype).removeprefix("torch."), _nbytes(sent))
        self.spans.append(Span(kind, unit, start, end, phase, self.step, dtype, nbytes))
        if sample:
            self.sample(end)

    def recording(self) -> bool:
        """In a traced step, on the training thread (a background save's collectives are not the step's)."""
        return self._in_step and threading.get_ident() == self._thread

    def innermost(self, kind: str) -> str:
        """The unit whose span of `kind` ("forward", "backward") opened last and is still open; "" is the root."""
        return next((name for open_kind, name in reversed(self._open) if open_kind == kind), "")

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
        if in_backward():
            return "backward"
        return "forward" if self._forward_depth > 0 else "step"

    def _collective(self, fn, kind: str):
        def traced(*args, **kwargs):
            # Count once (a deprecated name forwards to a newer one), and only the training thread's:
            # a background checkpoint writes on its own group from its own thread.
            if getattr(self._calls, "inside", False) or not self.recording():
                return fn(*args, **kwargs)
            self._calls.inside = True
            sent = _sent(args, kwargs)
            start = _now()
            try:
                return fn(*args, **kwargs)
            finally:
                self._calls.inside = False
                unit, phase = getattr(self._current_unit, "name", ""), self._phase()
                self._add(self._relabel(kind), unit, start, _now(), phase, sent)

        return traced

    def _relabel(self, kind: str) -> str:
        """HSDP's all-reduce across replicas is the only all-reduce FSDP runs inside a unit's post-backward."""
        inside_post_backward = getattr(self._current_unit, "entry", "") == "post_backward"
        return "replica_all_reduce" if kind == "all_reduce" and inside_post_backward else kind

    def _naming(self, method, kind: str):
        """Wrap an FSDP entry point so collectives inside it carry its unit's name;
        a unit's post-backward also ends that unit's backward span."""
        recorder = self

        def named(obj, *args, **kwargs):
            name = recorder._unit_of(obj)
            if kind == "post_backward" and ("backward", name) in recorder._open:
                recorder._add("backward", name, recorder._open.pop(("backward", name)), _now())
            previous = getattr(recorder._current_unit, "name", ""), getattr(recorder._current_unit, "entry", "")
            recorder._current_unit.name, recorder._current_unit.entry = name, kind
            start = _now()
            try:
                return method(obj, *args, **kwargs)
            finally:
                recorder._current_unit.name, recorder._current_unit.entry = previous
                if kind == "wait":  # FSDP2 waiting for a gather and copying it out into the parameters
                    recorder._add("wait", name, start, _now(), recorder._phase())
                else:
                    recorder.sample()  # the gathered buffer exists only once the entry point returns

        return named

    def _unit_of(self, obj) -> str:
        if self.version == 2:  # FSDP2's FSDPParamGroup
            return fsdp2_group_name(obj)
        # FSDP1: the FSDP state (`_reduce_grad`'s first argument) or the FlatParamHandle
        return self.owners.get(id(fsdp1_unit_module(obj)), "")


# ---- what to hook -----------------------------------------------------------------------
def _units(model: nn.Module, version: int) -> tuple[dict[int, str], dict[int, str]]:
    """Two maps to unit names: the modules whose forward is the unit's (FSDP1: the FSDP wrappers;
    FSDP2: the modules `fully_shard` was called on), and the modules FSDP's handles point at."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    units, owners = {}, {}
    for name, module in model.named_modules():
        if version == 1 and isinstance(module, FSDP):
            units[id(module)] = owners[id(module.module)] = clean_name(name)
        elif version == 2 and isinstance(module, FSDPModule):
            units[id(module)] = owners[id(module)] = clean_name(name)
    return units, owners


def _memory_probes(model: nn.Module, version: int) -> list:
    """Functions returning the bytes of unsharded parameter storage alive now, one per unit.

    Each is called once here, so a torch without the buffers they read refuses the trace now."""
    if version == 2:
        from torch.distributed.fsdp import FSDPModule

        groups = [fsdp2_group(m) for m in model.modules() if isinstance(m, FSDPModule)]
        probes = [lambda g=g: fsdp2_gathered_bytes(g) for g in groups if g is not None]
    else:
        probes = [lambda h=h: fsdp1_gathered_bytes(h) for h in fsdp1_handles(model).values()]
    for probe in probes:
        probe()
    return probes


def _sent(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The tensor a collective sends: the input of `f(output, input, ...)` (all-gather, reduce-scatter),
    or the tensor of `all_reduce(tensor)`; a list's first tensor."""
    candidates = [*args[1:2], *args[:1], *(kwargs.get(k) for k in ("input", "input_tensor", "tensor"))]
    for value in candidates:
        if isinstance(value, (list, tuple)) and value:
            value = value[0]
        if torch.is_tensor(value):
            return value
    return None


def _nbytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def _tensors(output) -> list[torch.Tensor]:
    if torch.is_tensor(output):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in _tensors(item)]
    return []
