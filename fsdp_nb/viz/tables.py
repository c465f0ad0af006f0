"""Deterministic text views of layouts and memory, for notebooks checked by nbval.

`format_fsdp1(layout)` prints one line per rank, e.g.
    rank 0: l1.weight[0:24] l1.bias[0:6] l2.weight[0:17]
    rank 1: l2.weight[17:36] l2.bias[0:6] l3.weight[0:18] l3.bias[0:3] pad[1]
Element ranges are of the flattened parameter (FSDP1) or rows of dim 0 (FSDP2).
"""

from __future__ import annotations

from collections.abc import Sequence

from fsdp_nb.layout import Fsdp1Layout, Fsdp2Layout, Problem


def format_problems(problems: Sequence[Problem]) -> str:
    """One block per problem: what torch does, then why."""
    lines = []
    for p in problems:
        if p.severity == "error":
            lines.append(f"error {p.when}: {p.raises}")
        else:
            lines.append(f"warning {p.when}:")
        lines.append(f"  why: {p.message}")
    return "\n".join(lines)


def format_fsdp1(layout: Fsdp1Layout) -> str:
    """FSDP1: the FlatParameter's size and padding, then each rank's chunk in order."""
    head = (
        f"FSDP1 FlatParameter (use_orig_params={layout.use_orig_params}, world size {layout.world_size}): "
        f"{layout.total_numel} elements + {layout.padding_numel} padding = {layout.padded_numel}, "
        f"{layout.chunk_numel} per rank"
    )
    lines = [head]
    for r in range(layout.world_size):
        parts = [f"pad[{s.numel}]" if s.name is None else f"{s.name}[{s.start}:{s.stop}]" for s in layout.segments(r)]
        lines.append(f"rank {r}: " + " ".join(parts))
    if layout.problems:
        lines.append(format_problems(layout.problems))
    return "\n".join(lines)


def format_fsdp2(layout: Fsdp2Layout) -> str:
    """FSDP2: each rank's rows of every parameter, with the padding rows its storage adds."""
    lines = [f"FSDP2 (world size {layout.world_size}): dim 0 of every parameter split across ranks"]
    for r in range(layout.world_size):
        parts = []
        for i, spec in enumerate(layout.params):
            start, stop = layout.row_ranges[i][r]
            pad = layout.padded_rows[i] - (stop - start)
            parts.append(f"{spec.name}[{start}:{stop}]" + (f"+{pad}pad" if pad else ""))
        lines.append(f"rank {r}: " + " ".join(parts))
    if layout.problems:
        lines.append(format_problems(layout.problems))
    return "\n".join(lines)


def format_layout(layout: Fsdp1Layout | Fsdp2Layout) -> str:
    """`format_fsdp1` or `format_fsdp2`, whichever fits."""
    if isinstance(layout, Fsdp1Layout):
        return format_fsdp1(layout)
    if isinstance(layout, Fsdp2Layout):
        return format_fsdp2(layout)
    raise TypeError(f"format_layout: expected Fsdp1Layout or Fsdp2Layout, got {type(layout).__name__}")


def format_shapes(layout: Fsdp2Layout) -> str:
    """FSDP2: a table of `to_local()` shapes, one column per rank."""
    head = ["param", "shape"] + [f"rank {r}" for r in range(layout.world_size)]
    rows = [head]
    for spec in layout.params:
        shapes = [str(layout.local_shape(spec.name, r)) for r in range(layout.world_size)]
        rows.append([spec.name, str(spec.shape)] + shapes)
    widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def format_memory(reports: Sequence) -> str:
    """Per-rank bytes of `fsdp_nb.inspect.MemoryReport`s: parameters, gradients, optimizer state."""

    def cell(b):
        return f"{b.real}+{b.padding}"

    rows = [["rank", "params", "grads", "optimizer", "total"]]
    for m in sorted(reports, key=lambda m: m.rank):
        rows.append([str(m.rank), cell(m.params), cell(m.grads), cell(m.optimizer), str(m.total)])
    widths = [max(len(row[c]) for row in rows) for c in range(5)]
    body = "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)
    return body + "\n(bytes, real+padding)"
