"""How a tensor-parallel plan places each parameter, and which elements a rank of an (R, S, T) mesh keeps. Pure.

[Note: TP layouts]
A plan maps module names to Hugging Face's words, `{"l1": "colwise", "l2": "rowwise"}`,
`*` standing for one name part. torch's `ColwiseParallel` makes a Linear's weight and
bias `Shard(dim=0)` on the "tp" mesh dim (each TP rank keeps its rows: its output
features); `RowwiseParallel` makes the weight `Shard(dim=1)` (its input features) and
the bias `Replicate()`. A parameter the plan leaves out never touches the "tp" dim:
it is a DTensor on the data-parallel mesh alone, and the T ranks of a TP group hold
the same copy of it.

`fully_shard` then cuts each rank's *TP-local* tensor on dim 0 over the S ranks of
a shard group, as it cuts any parameter [Note: FSDP2 row layout]. For a rowwise
weight that is a plain `(Shard(dim=0), Shard(dim=1))`: rows by shard rank s,
columns by TP rank t. For a colwise weight both cuts fall on dim 0, TP's first:
rank (s, t) keeps rows `s`-th chunk of TP chunk `t`. That is not the s-th chunk of
the whole dim, so torch names it `_StridedShard(dim=0, sf=T)`: a shard taken with
a stride of T pieces. With 6 rows, S = 2, T = 2: TP gives rows 0-2 to t=0 and 3-5 to
t=1; FSDP gives (s=0, t=0) rows 0-1, (s=1, t=0) row 2, (s=0, t=1) rows 3-4, (s=1, t=1) row 5.

Ranks are row-major on (R, S, T), tp last: rank = (r·S + s)·T + t, as fsdp_nb builds
the mesh. Only even TP cuts are modelled: `fsdp_nb.sharding` refuses the others.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from fsdp_nb.layout.specs import ParamSpec

FSDP1_HAS_NO_TP = (
    "FSDP1 has no tensor-parallel form: it flattens a unit's whole parameters into one 1-D FlatParameter, "
    "while TP needs each weight to stay a tensor of its own, cut by rows or columns (a DTensor), which FSDP2 "
    "then shards again"
)
STYLES = ("colwise", "rowwise")  # Hugging Face's words for torch's ColwiseParallel, RowwiseParallel
TP_SHARD0, TP_SHARD1, TP_REPLICATE = "Shard(dim=0)", "Shard(dim=1)", "Replicate()"  # repr() of torch's placements


def plan_regex(pattern: str) -> re.Pattern:
    """A plan key as a regex over module names: `*` is one name part (a layer index)."""
    return re.compile(re.escape(pattern).replace(r"\*", r"[^.]+"))


def check_styles(plan: Mapping[str, str]) -> None:
    for pattern, style in plan.items():
        if style not in STYLES:
            raise ValueError(
                f"tp_plan[{pattern!r}]={style!r} is not a plan word fsdp_nb applies; accepted: {', '.join(STYLES)}"
            )


def tp_placements(specs: Sequence[ParamSpec], tp: int, tp_plan: Mapping[str, str] | None) -> tuple[str | None, ...]:
    """Per parameter, its placement on the "tp" mesh dim (`TP_SHARD0`, ...), or None where the plan leaves it out."""
    if tp == 1:
        if tp_plan:
            raise ValueError("tp_plan= needs tp > 1; accepted: tp=2 or more, or no tp_plan")
        return (None,) * len(specs)
    if not tp_plan:
        raise ValueError(
            f'tp={tp} needs tp_plan=, e.g. {{"l1": "colwise", "l2": "rowwise"}} or a model\'s base_model_tp_plan'
        )
    check_styles(tp_plan)
    out: list[str | None] = [None] * len(specs)
    for pattern, style in tp_plan.items():
        regex, hit = plan_regex(pattern), False
        for i, spec in enumerate(specs):
            module, _, leaf = spec.name.rpartition(".")
            if not regex.fullmatch(module):
                continue
            hit = True
            out[i] = _placement(spec, leaf, style, tp, pattern)
        if not hit:
            raise ValueError(f"tp_plan key {pattern!r} matches no module of these parameters")
    return tuple(out)


def _placement(spec: ParamSpec, leaf: str, style: str, tp: int, pattern: str) -> str:
    if (leaf, len(spec.shape)) not in (("weight", 2), ("bias", 1)):
        raise ValueError(
            f"tp_plan[{pattern!r}]={style!r} reaches {spec.name} of shape {spec.shape}; colwise and rowwise "
            "apply to nn.Linear (a 2-D weight and a 1-D bias)"
        )
    if style == "rowwise" and leaf == "bias":
        return TP_REPLICATE  # added once, after the partial outputs are summed
    dim = 0 if style == "colwise" else 1
    if spec.shape[dim] % tp:
        raise ValueError(
            f"tp_plan: {spec.name} is {style} on tp={tp} but its dim {dim} ({spec.shape[dim]}) does not split "
            f"evenly; use a tp that divides {spec.shape[dim]}"
        )
    return TP_SHARD0 if dim == 0 else TP_SHARD1


def mesh_coords(rank: int, S: int, T: int) -> tuple[int, int, int]:
    """(r, s, t) of a global rank on the row-major (R, S, T) mesh."""
    return rank // (S * T), rank // T % S, rank % T


def tp_rows(rows: int, placement: str | None, T: int, t: int) -> tuple[int, int]:
    """`[start, stop)` of dim 0 that TP rank t holds before FSDP cuts it: a TP chunk for `TP_SHARD0`, else all."""
    if placement != TP_SHARD0:
        return 0, rows
    n = rows // T
    return t * n, (t + 1) * n


def tp_cols(shape: tuple[int, ...], placement: str | None, T: int, t: int) -> tuple[int, int] | None:
    """`[start, stop)` of dim 1 that TP rank t holds for `TP_SHARD1`; None: the whole row."""
    if placement != TP_SHARD1:
        return None
    n = shape[1] // T
    return t * n, (t + 1) * n


def placements_of(placement: str | None, dp_replicate: int, tp: int) -> tuple[str, ...]:
    """torch's placements over the mesh a parameter lives on, as `repr` strings [Note: TP layouts]."""
    dp = f"_StridedShard(dim=0, sf={tp})" if placement == TP_SHARD0 else "Shard(dim=0)"
    return (("Replicate()",) if dp_replicate > 1 else ()) + (dp,) + ((placement,) if placement else ())
