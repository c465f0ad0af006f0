"""Recording tensor parallelism's (TP) collectives in a traced step (rank side), for `capture.Recorder`.

Why a module of its own: TP does not call the `torch.distributed` collectives the recorder
wraps for FSDP. Its layers are DTensors, and DTensor redistributes through the *functional*
collectives: `_functional_collectives.all_reduce` (a rowwise layer's Partial output made
Replicate in forward, a colwise layer's Partial input gradient in backward),
`all_gather_single` and `reduce_scatter_single` (a Shard made whole, and its gradient).
DTensor looks them up from that module at call time, so wrapping the module's functions
sees every one: on torch 2.13 they were all the `_c10d_functional` ops of a TP step that
`torch.profiler` counted. A `TorchDispatchMode` would see them too, but it would also see
every aten op of the step; the wrappers cost a few microseconds per collective.

A functional collective is asynchronous: the call hands the work to the process group
(gloo runs it on its own thread) and returns an AsyncCollectiveTensor at once, and the
rank blocks in `wait_tensor` when the result is first used, usually the next op. So a
span runs from the call to the end of that wait: the time the rank had the collective in
flight, its compute of the ops in between included. A result nobody waited for by the
end of the step ends where its call did. These spans take no memory sample: they move
activations and gradients, never FSDP's unsharded parameters (and a sample of the debug
GPT's 3 units costs ~6 µs, more than the wrapping).

Kinds: inside a unit's forward or backward a functional collective is TP's,
"tp_all_reduce", "tp_all_gather" or "tp_reduce_scatter", of the innermost unit whose
forward (backward) is running. Elsewhere in the step it is the step's own (the gradient
norm of TP's DTensors, reduced through DTensor), recorded under the plain kind beside the
loss's and the other norms' all-reduces.
"""

from __future__ import annotations

import threading

import torch

from fsdp_nb._torch import functional_collective_functions, functional_pending

TP_PHASES = ("forward", "backward")


class FunctionalCollectives:
    """Wraps the functional collectives and `wait_tensor` for one Recorder's traced steps."""

    def __init__(self, recorder, clock):
        self.recorder, self.now = recorder, clock  # the Recorder's clock: one time axis for every span
        # looked up now: a torch without them refuses the trace instead of drawing no TP lanes
        self.module, self.names = functional_collective_functions()
        # id(tensor a later wait receives) -> (that tensor, kind, unit, start, issued, phase, sent); holding the
        # tensor keeps its id from being reused before its wait
        self._pending: dict[int, tuple] = {}
        self._calls = threading.local()  # inside a collective: a deprecated name forwarding to a newer one

    def install(self, patch) -> None:
        """Wrap each collective and the wait with `patch(owner, name, replacement)` (the Recorder's, undone on exit)."""
        for name, kind in self.names:
            patch(self.module, name, self._collective(getattr(self.module, name), kind))
        patch(self.module, "wait_tensor", self._wait(self.module.wait_tensor))

    def flush(self) -> None:
        """At a step's end: a collective whose result was never waited for ends where its call returned."""
        for _, kind, unit, start, issued, phase, sent in self._pending.values():
            self.recorder._add(kind, unit, start, issued, phase, sent, sample=False)
        self._pending.clear()

    def _collective(self, fn, kind: str):
        recorder = self.recorder

        def traced(*args, **kwargs):
            if getattr(self._calls, "inside", False) or not recorder.recording():
                return fn(*args, **kwargs)
            self._calls.inside = True
            start = self.now()
            try:
                result = fn(*args, **kwargs)
            finally:
                self._calls.inside = False
            phase = recorder._phase()
            tp = phase in TP_PHASES
            span = ("tp_" + kind if tp else kind, recorder.innermost(phase) if tp else "", start)
            sent = args[0] if args and torch.is_tensor(args[0]) else kwargs.get("self")  # f(self, ...)
            waited_on = functional_pending(result)
            issued = self.now()
            if waited_on is None:  # done already: the span is the call
                recorder._add(*span, issued, phase, sent, sample=False)
            else:
                self._pending[id(waited_on)] = (waited_on, *span, issued, phase, sent)
            return result

        return traced

    def _wait(self, fn):
        recorder = self.recorder

        def traced(tensor, *args, **kwargs):
            entry = self._pending.pop(id(tensor), None)  # an id held in _pending is this very tensor's
            if entry is None:
                return fn(tensor, *args, **kwargs)
            _, kind, unit, start, _, phase, sent = entry
            try:
                return fn(tensor, *args, **kwargs)
            finally:
                recorder._add(kind, unit, start, self.now(), phase, sent, sample=False)

        return traced
