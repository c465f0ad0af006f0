"""What a cell returns from the ranks: CellResult, and RankError for failures.

RankError renders like a local traceback in IPython (`_render_traceback_`): each
distinct remote error once, labelled with the ranks that raised it, the first
failing rank first; then ranks that died or were stuck, and what to do next. An
error fsdp_nb explains is shown short, others whole; `traceback()` (what `%fsdp_tb`
prints) shows every one whole (see fsdp_nb/session/error_text.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from fsdp_nb.session import protocol as P
from fsdp_nb.session.error_text import ITEM, POINTER, error_lines, wrap

_BRACED = re.compile(r"\{([^{}]*)\}")
_NUMBER = re.compile(r"\d+")


def same_error_key(text: str) -> str:
    """`text` with set/dict contents sorted and every number replaced: equal for errors that differ by accident."""
    text = _BRACED.sub(lambda m: "{" + ", ".join(sorted(part.strip() for part in m.group(1).split(","))) + "}", text)
    return _NUMBER.sub("#", text)


def rank_list(ranks) -> str:
    ranks = sorted(ranks)
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ",".join(map(str, ranks))


@dataclass
class CellResult:
    """One request's outcome on every rank it ran on."""

    ranks: list[int]
    world_size: int
    dones: dict[int, P.Done] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)  # ranks in the order their Done arrived
    died: dict[int, str] = field(default_factory=dict)  # rank -> "exited with signal 9 (SIGKILL)"
    stuck: list[int] = field(default_factory=list)  # ranks that never finished
    interrupted: bool = False
    events: list[tuple[int, str, dict]] = field(default_factory=list)
    broken: str | None = None  # why the session can no longer be trusted, if it can't
    by_rank: bool = False  # report errors in rank order (collated mode: deterministic) not arrival order

    @property
    def ok(self) -> bool:
        return not self.errors and not self.died and not self.stuck

    @property
    def errors(self) -> list[tuple[int, P.RemoteError]]:
        """(rank, error): the first failing rank first, or in rank order when `by_rank`."""
        order = sorted(self.order) if self.by_rank else self.order
        return [(r, self.dones[r].error) for r in order if self.dones[r].error is not None]

    @property
    def values(self) -> list[Any]:
        """The cell's last-expression value per rank, indexed by rank (None where absent)."""
        out: list[Any] = [None] * self.world_size
        for r in self.dones:
            out[r] = self._load(r)[0]
        return out

    def load_problems(self) -> dict[int, str]:
        """Ranks whose value pickled there but cannot be rebuilt in this process, and why."""
        return {r: why for r in sorted(self.dones) if (why := self._load(r)[1])}

    def _load(self, r: int) -> tuple[Any, str | None]:
        d = self.dones[r]
        if d.value is None:
            return d.value_repr, None
        try:
            return P.unpickled(d), None
        except Exception as e:  # e.g. a class this process cannot import
            why = f"{type(e).__name__}: {e}"
            return f"<rank {r}'s value could not be loaded here: {why}>", why

    def notes(self) -> list[str]:
        return [
            f"[rank {r}] note: result shown as its repr: {self.dones[r].note}"
            for r in sorted(self.dones)
            if self.dones[r].note
        ]

    def raise_errors(self) -> CellResult:
        if not self.ok:
            raise RankError(self)
        return self


class RankError(Exception):
    """Raised in the kernel when a cell failed on one or more ranks."""

    def __init__(self, result: CellResult):
        self.result = result
        super().__init__(self.summary())

    def summary(self) -> str:
        res = self.result
        parts = []
        groups = self.groups()
        if res.by_rank:
            # Deterministic wording: ranks merged by exception type, the lowest rank's message.
            # (Messages can differ between ranks in incidental ways, e.g. the order of a set.)
            by_type: dict[str, tuple[list[int], P.RemoteError]] = {}
            for r, e in res.errors:
                by_type.setdefault(e.type, ([], e))[0].append(r)
            parts.extend(f"{rank_list(ranks)} failed: {e.headline()}" for ranks, e in by_type.values())
        elif len(groups) == 1:  # the same error everywhere: name all its ranks, in rank order
            ranks, err = groups[0]
            parts.append(f"{rank_list(ranks)} failed: {err.headline()}")
        elif groups:
            (first_rank, *_), first = groups[0]
            parts.append(f"rank {first_rank} failed first: {first.headline()}")
        for r, why in sorted(res.died.items()):
            parts.append(f"rank {r} {why}")
        stuck = sorted(set(res.stuck) | {r for r, e in res.errors if e.timeout})
        if stuck:
            parts.append(f"{rank_list(stuck)} stuck in a collective")
        return "; ".join(parts) or "cell failed"

    def groups(self) -> list[tuple[list[int], P.RemoteError]]:
        """The same error on several ranks merged, in order of first arrival (in rank order when collated).

        "The same" ignores what differs between ranks by accident: the order in which a set
        or dict prints (torch prints a set of dtypes in hash order, which differs between
        processes) and numbers (a rank's own index, its shard's size).
        """
        groups: dict[str, tuple[list[int], P.RemoteError]] = {}
        for r, e in self.result.errors:
            groups.setdefault(same_error_key(e.traceback or e.headline()), ([], e))[0].append(r)
        return list(groups.values())

    def _render_traceback_(self) -> list[str]:
        """What IPython shows: errors fsdp_nb explains in short, with a pointer to the whole traceback."""
        return self.lines(full=False)

    def traceback(self) -> str:
        """Every failed rank's whole traceback, identical ones merged: what `%fsdp_tb` prints."""
        return "\n".join(self.lines(full=True))

    def lines(self, *, full: bool) -> list[str]:
        """The rendering, one list item per line of at most error_text.WIDTH characters."""
        lines: list[str] = []
        errors = dict(self.result.errors)
        groups = self.groups()
        for ranks, err in groups:
            lines.extend(error_lines(f"[{rank_list(ranks)}]", err, full=full))
            others = [
                r for r in ranks if (errors[r].traceback or errors[r].headline()) != (err.traceback or err.headline())
            ]
            if others:  # merged, but not word for word: say whose words these are
                shown = next(r for r in ranks if errors[r] is err)
                why = f"{rank_list(others)} said the same with other numbers or another set order"
                lines.extend(wrap(f"(rank {shown}'s message; {why})", ITEM))
        if not full and any(err.short for _, err in groups):
            lines.append(POINTER)  # once, however many errors were shortened
        res = self.result
        for r, why in sorted(res.died.items()):
            lines.extend(wrap(f"[rank {r}] {why}"))
        if res.stuck:
            lines.extend(
                wrap(f"{rank_list(res.stuck)} did not finish (stuck in a collective or ignoring the interrupt)")
            )
        if res.broken:
            lines.extend(wrap(f"The session is broken ({res.broken}). Run %fsdp_restart (or session.restart())."))
        return lines

    def __str__(self) -> str:
        return self.summary()
