"""What a traced training step is made of: spans on each rank, and unsharded bytes over time.

Pure data (frozen dataclasses of plain values), so a trace pickles from the ranks to
the notebook and figures are pure functions of it. Times are seconds since the
trace's start, on one clock shared by every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The kinds of span, in the order the timeline draws their bands.
COMPUTE = ("forward", "backward")
# "replica_all_reduce": hybrid sharding's all-reduce of a unit's reduce-scattered gradient across
# replicas; "all_reduce": any other (the step's averaged loss, the gradient norm).
# Tensor parallelism's collectives (DTensor's functional collectives), inside a unit's forward or backward:
# a rowwise layer's output all-reduced in forward, a colwise layer's input gradient in backward, ...
TENSOR_PARALLEL = ("tp_all_gather", "tp_reduce_scatter", "tp_all_reduce")
COMMUNICATION = ("all_gather", "reduce_scatter", "replica_all_reduce", "all_reduce", *TENSOR_PARALLEL, "wait")
KINDS = (*COMPUTE, *COMMUNICATION, "optimizer")
LAUNCH_NOTE = "CUDA: spans are host launch times, not GPU time; torch.profiler shows the device side"


@dataclass(frozen=True)
class Span:
    """One interval on one rank: `kind` (see KINDS) of `unit` ("" is the root) from `start` to `end`."""

    kind: str
    unit: str
    start: float
    end: float
    phase: str = ""
    """For collectives: "forward", "backward", "optimizer" or "step" (elsewhere in the step). TP's
    collectives run from their call to the end of the wait on their result, the rest are the call."""
    step: int = 0
    """Which traced step (0-based) the span belongs to."""
    dtype: str = ""
    """For collectives: the dtype of what this rank sent ("bfloat16", "float32"); "" otherwise."""
    nbytes: int = 0
    """For collectives: the bytes this rank sent (its shard for an all-gather, the whole input of a
    reduce-scatter)."""

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class RankTrace:
    """Everything one rank recorded."""

    rank: int
    spans: tuple[Span, ...]
    steps: tuple[tuple[float, float], ...]
    """(start, end) of each traced step."""
    memory: tuple[tuple[float, int], ...]
    """(time, bytes of unsharded parameters alive), sampled at every span boundary."""
    sharded_bytes: int = 0
    """Bytes of this rank's sharded parameters: the floor the unsharded bytes sit on."""
    root_bytes: int = 0
    """Unsharded bytes of the root unit's parameters, which torch keeps gathered after forward."""

    def count(self, kind: str, phase: str | None = None, step: int | None = None) -> int:
        return sum(
            1
            for s in self.spans
            if s.kind == kind and (phase is None or s.phase == phase) and (step is None or s.step == step)
        )


@dataclass(frozen=True)
class Trace:
    """A traced run of one or more steps on every rank of a process group."""

    label: str
    fsdp_version: int
    world_size: int
    ranks: tuple[RankTrace, ...]
    units: tuple[str, ...]
    """The FSDP units, outermost (root, "") first."""
    settings: dict = field(default_factory=dict)
    """How the model was sharded (reshard_after_forward, strategy, prefetch), for titles and tests."""
    clock: str = "run"
    """"run": each span is when the work ran (CPU and gloo, where every call is synchronous).
    "launch": on CUDA, when the host issued the work; the GPU runs it later, overlapped, so
    the spans show the order and the host's time, not the device's."""

    @property
    def duration(self) -> float:
        return max((end for r in self.ranks for _, end in r.steps), default=0.0)

    def count(self, kind: str, phase: str | None = None, rank: int = 0, step: int | None = None) -> int:
        """How many spans of `kind` (in `phase`, of `step`) rank `rank` recorded."""
        return self.ranks[rank].count(kind, phase, step)

    def step_seconds(self) -> list[float]:
        """Each traced step's duration, the slowest rank's."""
        n = len(self.ranks[0].steps)
        return [max(r.steps[i][1] - r.steps[i][0] for r in self.ranks) for i in range(n)]

    def summary(self) -> str:
        """One line per rank: step time and the collectives of one step."""
        lines = [f"{self.label}: FSDP{self.fsdp_version}, {self.world_size} ranks, {len(self.units)} units"]
        if self.clock == "launch":
            lines.append(f"  ({LAUNCH_NOTE})")
        for r in self.ranks:
            n = max(1, len(r.steps))
            ag_f, ag_b = r.count("all_gather", "forward") // n, r.count("all_gather", "backward") // n
            rs, ar = r.count("reduce_scatter") // n, r.count("replica_all_reduce") // n
            step_ms = 1e3 * sum(end - start for start, end in r.steps) / n
            replicas = f", {ar} all-reduces across replicas" if ar else ""  # hybrid sharding only
            tp_f, tp_b = (sum(r.count(k, phase) for k in TENSOR_PARALLEL) // n for phase in ("forward", "backward"))
            tp = f"; TP collectives {tp_f} forward + {tp_b} backward" if tp_f or tp_b else ""
            lines.append(
                f"  rank {r.rank}: {step_ms:.1f} ms per step; all-gathers {ag_f} forward + {ag_b} backward, "
                f"{rs} reduce-scatters{replicas}{tp}"
            )
        return "\n".join(lines)
