"""A small covering array: every pair of option values in at least one combination (all-pairs testing).

Features interact: activation checkpointing with RAM-efficient loading, offload with
mixed precision. Testing each option alone misses those; testing every combination
is hundreds of runs. A set in which every *pair* of values meets once catches the
interactions of two options, which is where most of them are, in a dozen runs.
"""

from __future__ import annotations

from itertools import combinations, product


def uncovered(rows: list[dict], factors: dict[str, list]) -> set[tuple]:
    """The pairs of (option, value) that no row of `rows` holds together."""
    need = {((a, va), (b, vb)) for a, b in combinations(factors, 2) for va, vb in product(factors[a], factors[b])}
    for row in rows:
        need -= {((a, row[a]), (b, row[b])) for a, b in combinations(factors, 2)}
    return need


def all_pairs(factors: dict[str, list], must: list[dict] = ()) -> list[dict]:
    """Rows that cover every pair of values of `factors`, starting from the rows in `must`.

    Greedy, and deterministic: each new row is the full combination that covers the most
    pairs still missing (the first such in `product` order). Fine for a few binary options.
    """
    names = list(factors)
    rows = [dict(r) for r in must]
    missing = uncovered(rows, factors)
    candidates = [dict(zip(names, values)) for values in product(*(factors[n] for n in names))]
    while missing:
        best = max(candidates, key=lambda row: _gain(row, missing))
        rows.append(best)
        missing = uncovered(rows, factors)
    return rows


def _gain(row: dict, missing: set[tuple]) -> int:
    return sum(((a, row[a]), (b, row[b])) in missing for a, b in combinations(row, 2))
