"""Per-rank timelines of a training step: compute, communication, the optimizer, and unsharded memory.

`plot_timeline(trace)` or `plot_timeline([t1, t2, ...])`: one block per trace, all on
one time axis, so FSDP1 and FSDP2 (or two settings of FSDP2) compare by eye. In a
block, each rank has a lane with two bands, compute above and communication below,
and under the lanes a curve of the bytes of unsharded parameters alive on each rank.
Colours mean the same thing in every figure (`COLORS`).
"""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from fsdp_nb.trace.spans import Trace
from fsdp_nb.viz.labels import legend_grid, text_width_pt

COLORS = {
    "forward": "#4C72B0",
    "backward": "#DD8452",
    "optimizer": "#8C8C8C",
    "all_gather": "#55A868",
    "reduce_scatter": "#C44E52",
    "replica_all_reduce": "#DA8BC3",
    "all_reduce": "#8172B3",
    "tp_all_gather": "#937860",
    "tp_reduce_scatter": "#2A7F62",
    "tp_all_reduce": "#64B5CD",
    "wait": "#CCB974",
}
LABELS = {
    "forward": "forward",
    "backward": "backward",
    "optimizer": "optimizer step",
    "all_gather": "all-gather",
    "reduce_scatter": "reduce-scatter",
    "replica_all_reduce": "all-reduce across replicas",
    "all_reduce": "all-reduce",
    "tp_all_gather": "TP all-gather",
    "tp_reduce_scatter": "TP reduce-scatter",
    "tp_all_reduce": "TP all-reduce",
    "wait": "wait",
}
LEGEND_PT = 8.33  # matplotlib's "small" at its default 10 pt
_MEMORY_COLORS = ("#1f1f1f", "#7f7f7f", "#bcbd22", "#17becf", "#9467bd", "#8c564b", "#e377c2", "#ff7f0e")


def plot_timeline(
    traces: Trace | Sequence[Trace], *, labels: Sequence[str] | None = None, width: float = 9.4
) -> Figure:
    """A Figure of one or more traces on a shared time axis (milliseconds from each trace's start).

    Root-unit spans are drawn pale, with the spans of the units inside them on top:
    the root's forward contains the whole forward. `width` is in inches; the default
    fits a notebook's output area (about 950 px).
    """
    traces = [traces] if isinstance(traces, Trace) else list(traces)
    if not traces:
        raise ValueError("plot_timeline: give at least one Trace (from session.trace or fsdp_nb.trace_step)")
    labels = list(labels) if labels is not None else [t.label for t in traces]
    if len(labels) != len(traces):
        raise ValueError(f"plot_timeline: {len(labels)} labels for {len(traces)} traces")
    heights = []
    for t in traces:
        heights += [0.42 * t.world_size + 0.3, 0.75]
    fig = Figure(figsize=(width, sum(heights) + 0.9), layout="constrained")
    axes = fig.subplots(len(heights), 1, sharex=True, gridspec_kw={"height_ratios": heights})
    end = max(t.duration for t in traces) * 1e3
    for i, (trace, label) in enumerate(zip(traces, labels)):
        _lanes(axes[2 * i], trace, label)
        _memory(axes[2 * i + 1], trace)
    axes[-1].set_xlim(0, end * 1.01)
    axes[-1].set_xlabel("time in the step (ms)")
    kinds = [k for k in COLORS if any(s.kind == k for t in traces for r in t.ranks for s in r.spans)]
    handles = [Patch(color=COLORS[k], label=LABELS[k]) for k in kinds]
    columns = _legend_columns([LABELS[k] for k in kinds], width)
    fig.legend(handles=handles, loc="outside upper center", ncols=columns, fontsize=LEGEND_PT, frameon=False)
    return fig


def _legend_columns(labels: list[str], width: float) -> int:
    """All in one row while it fits the figure's width (FSDP's kinds), else an even grid (TP's kinds added)."""
    em = LEGEND_PT  # each entry: a 2 em handle, 0.8 em gap, its text; 2 em between entries
    row = sum(2.8 * em + text_width_pt(t, LEGEND_PT) for t in labels) + 2.0 * em * len(labels)  # + the borders
    return max(1, len(labels)) if row <= width * 72 else legend_grid(labels, width, LEGEND_PT)[0]


def _lanes(ax, trace: Trace, label: str) -> None:
    for rank_trace in trace.ranks:
        y = trace.world_size - 1 - rank_trace.rank  # rank 0 on top
        ordered = sorted(rank_trace.spans, key=lambda s: (s.unit != "", s.start))  # the root first, under the rest
        for span in ordered:
            compute = span.kind in ("forward", "backward", "optimizer")
            bottom = y + (0.5 if compute else 0.06)
            pale = span.unit == "" and span.kind in ("forward", "backward")
            rect = Rectangle(
                (span.start * 1e3, bottom),
                max(span.seconds * 1e3, 0.05),
                0.42,
                facecolor=COLORS[span.kind],
                alpha=0.35 if pale else 1.0,
                edgecolor="white",
                linewidth=0.4,
            )
            rect.set_gid(span.kind)
            ax.add_patch(rect)
    ax.set_ylim(0, trace.world_size)
    ax.set_yticks([trace.world_size - 1 - r + 0.5 for r in range(trace.world_size)])
    ax.set_yticklabels([f"rank {r}" for r in range(trace.world_size)], fontsize="small")
    ax.tick_params(axis="y", length=0)
    steps = trace.step_seconds()
    per_step = f"{1e3 * sum(steps) / len(steps):.1f} ms per step" if steps else ""
    clock = "; host launch times (CUDA)" if trace.clock == "launch" else ""
    ax.set_title(f"{label}: {per_step} (compute above, communication below{clock})", fontsize="medium", loc="left")
    for start, _ in trace.ranks[0].steps[1:]:
        ax.axvline(start * 1e3, color="black", linewidth=0.6, linestyle=":")


def _memory(ax, trace: Trace) -> None:
    peak = max((b for r in trace.ranks for _, b in r.memory), default=0)
    unit, scale = ("MiB", 2**20) if peak >= 2**20 else ("KiB", 2**10)
    for r in trace.ranks:
        times = [t * 1e3 for t, _ in r.memory]
        values = [b / scale for _, b in r.memory]
        ax.step(
            times,
            values,
            where="post",
            linewidth=1.0,
            color=_MEMORY_COLORS[r.rank % len(_MEMORY_COLORS)],
            label=f"rank {r.rank}",
        )
    ax.set_ylabel(f"unsharded\n{unit}", fontsize="small")
    ax.set_ylim(0, max(peak / scale * 1.15, 1e-9))
    ax.tick_params(axis="y", labelsize="small")
    # One row above the panel's right end, outside the curves whatever the time range shown.
    ax.legend(
        fontsize="x-small",
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        ncols=trace.world_size,
        frameon=False,
        borderaxespad=0.2,
        borderpad=0.2,
    )
