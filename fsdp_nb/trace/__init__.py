"""See one training step: per-rank spans of communication, compute and unsharded memory.

    trace = fsdp_nb.trace_step(trainer, steps=1)        # on every rank: a cell, a script, torchrun
    fsdp_nb.viz.plot_timeline(trace)                     # in the notebook: session.trace("trainer")

`spans` is the data (pure), `capture` the rank-side recorder, `tp_collectives` its part that
records tensor parallelism's collectives.
"""

from __future__ import annotations

import socket
import warnings
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from fsdp_nb._torch import flat_info, fsdp1_root_handle, fsdp2_group, fsdp2_params
from fsdp_nb.phases import fail_together
from fsdp_nb.trace.capture import Recorder, _now
from fsdp_nb.trace.spans import COMMUNICATION, COMPUTE, KINDS, LAUNCH_NOTE, TENSOR_PARALLEL, RankTrace, Span, Trace

__all__ = ["COMMUNICATION", "COMPUTE", "KINDS", "TENSOR_PARALLEL", "RankTrace", "Span", "Trace", "trace_step"]


def trace_step(target, *, steps: int = 1, model: nn.Module | None = None, label: str | None = None) -> Trace:
    """Run `steps` training steps of `target` with the recorder on, on every rank; returns the whole Trace.

    `target` is a `Trainer` (its next steps are taken, and kept in its history) or a
    callable that runs one step, with `model=` the sharded model it trains. A
    collective: call it on every rank. Every rank gets the same Trace, its times in
    seconds from the start, on a clock all ranks share.
    """
    from fsdp_nb.sharding import config_of
    from fsdp_nb.train import Trainer

    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"trace_step: steps={steps!r} must be an int >= 1")
    if isinstance(target, Trainer):
        model = target.model
        step_fn = lambda: target.history.append(target.train_step(len(target.history)))  # noqa: E731
    elif callable(target):
        if model is None:
            raise ValueError("trace_step: a callable needs model=, the sharded model it trains")
        step_fn = target
    else:
        raise TypeError(f"trace_step: {type(target).__name__} is neither a Trainer nor a callable that runs one step")
    from fsdp_nb.checkpoint import wait_pending

    wait_pending()  # a background save in flight would share the cores and the clock with the traced steps
    recorder = None
    try:
        with fail_together("trace_step"):  # a recorder that cannot hook this torch refuses on every rank
            recorder = Recorder(model)
            recorder.__enter__()
        t0, offset = _shared_clock()
        for _ in range(steps):
            recorder.run_step(step_fn)
    finally:
        if recorder is not None:  # every hook and patch comes off again, whatever happened
            recorder.__exit__()

    def shift(t: float) -> float:
        return t - offset - t0

    mine = RankTrace(
        rank=dist.get_rank() if dist.is_initialized() else 0,
        spans=tuple(replace(s, start=shift(s.start), end=shift(s.end)) for s in recorder.spans),
        steps=tuple((shift(a), shift(b)) for a, b in recorder.steps),
        memory=tuple((shift(t), b) for t, b in recorder.memory),
        sharded_bytes=_sharded_bytes(model),
        root_bytes=_root_bytes(model, recorder.version),
    )
    ranks = [mine]
    if dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    ranks = _from_first_step(ranks)
    config = config_of(model)
    settings = {}
    if config is not None:
        settings = {
            "reshard_after_forward": config.reshard_after_forward,
            "sharding_strategy": config.sharding_strategy,
            "forward_prefetch": config.forward_prefetch,
        }
    units = tuple(sorted(set(recorder.units.values()), key=lambda n: (n.count(".") if n else -1, n)))
    clock = _clock_of(model)
    if clock == "launch":
        warnings.warn(f"trace_step: {LAUNCH_NOTE}", UserWarning, stacklevel=2)
    return Trace(
        label=label or f"FSDP{recorder.version}",
        fsdp_version=recorder.version,
        world_size=len(ranks),
        ranks=tuple(ranks),
        units=units,
        settings=settings,
        clock=clock,
    )


def _clock_of(model: nn.Module) -> str:
    """ "launch" when the model computes on CUDA: the recorder's clock is the host's, and CUDA and nccl
    run asynchronously, so a span ends when the work was queued, not when the GPU finished it."""
    if dist.is_initialized():
        from fsdp_nb.sharding import compute_device

        device = compute_device()  # parameters offloaded to CPU still compute on the GPU
    else:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return "launch" if device.type == "cuda" else "run"


def _from_first_step(ranks: list[RankTrace]) -> list[RankTrace]:
    """Times from the moment the first rank started the first step (0.0), the same shift for every rank."""
    zero = min(r.steps[0][0] for r in ranks)
    return [
        RankTrace(
            rank=r.rank,
            spans=tuple(replace(s, start=s.start - zero, end=s.end - zero) for s in r.spans),
            steps=tuple((a - zero, b - zero) for a, b in r.steps),
            memory=tuple((t - zero, b) for t, b in r.memory),
            sharded_bytes=r.sharded_bytes,
            root_bytes=r.root_bytes,
        )
        for r in ranks
    ]


def _shared_clock() -> tuple[float, float]:
    """(start time on rank 0's clock, this rank's offset from rank 0's clock), after a barrier.

    On one host `perf_counter` reads the same monotonic clock in every process, so the
    offset is 0 and times line up to the microsecond. Across hosts the offset comes
    from the moment every rank left the same barrier (good to a fraction of a ms).
    """
    if not dist.is_initialized():
        return _now(), 0.0
    dist.barrier()
    mine = (socket.gethostname(), _now())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    hosts = {host for host, _ in everyone}
    t0 = everyone[0][1]
    offset = 0.0 if len(hosts) == 1 else mine[1] - t0
    return t0, offset


def _sharded_bytes(model: nn.Module) -> int:
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def _root_bytes(model: nn.Module, version: int) -> int:
    """Unsharded bytes of the root unit's own parameters (what stays gathered after forward)."""
    if version == 2:
        group = fsdp2_group(model)
        if group is None:
            return 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        # the all-gather output of each parameter: its padded shard times the world size
        return sum(fp.padded_numel * world * fp.sharded.element_size() for fp in fsdp2_params(group))
    handle = fsdp1_root_handle(model)
    if handle is None:
        return 0
    info = flat_info(handle)
    return info.local_numel * info.world_size * info.flat.element_size()
