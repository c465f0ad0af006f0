"""Collective phases fail together: an error on one rank becomes an error on every rank, at once.

[Note: fail together]
Much of what fsdp_nb does on the ranks is one rank working while the others wait:
rank 0 checks its full weights before broadcasting them, builds the temporary
directory of a checkpoint, reads a file. If that work raises on rank 0 alone, the
other ranks are already inside the next collective (a broadcast), and gloo lets
them wait there until the process-group timeout: a minute of a frozen notebook,
then an error that names the wrong rank.

So every such phase is split in two:
1. local work, which may fail on any subset of ranks, inside `with fail_together(...)`;
2. collectives only, entered by every rank or by none.
On leaving the `with` block each rank hands the others its outcome (one
`all_gather_object`). A rank that failed raises its own error, unchanged, with its
own traceback; every other rank raises `PeerFailure`, which names the failed rank
and its error. No rank goes on into the collective part alone.

The exchange costs one small collective per phase (well under a millisecond on one
host). Without a process group it costs nothing and the error is simply raised.
"""

from __future__ import annotations

import torch.distributed as dist


class PeerFailure(RuntimeError):
    """Another rank failed in a phase this rank finished; raised so that no rank waits alone."""


def describe(e: BaseException) -> str:
    """`Type: first line of the message`: what the other ranks are told."""
    failures = getattr(e, "failures", None)  # DCP's CheckpointException: {rank: exception}
    if failures:
        _, inner = sorted(failures.items())[0]
        e = getattr(inner, "exc", inner)
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def outcomes(failure: BaseException | str | None, group=None) -> list[tuple[int, str]]:
    """Tell every rank of `group` how a phase went here, and learn how it went there: the (rank,
    description) of every rank that failed, the same list on every rank. A collective."""
    mine = failure if isinstance(failure, str) or failure is None else describe(failure)
    if not dist.is_initialized():
        return [(0, mine)] if mine else []
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    ranks = dist.get_process_group_ranks(group) if group is not None else range(len(everyone))
    return [(r, text) for r, text in zip(ranks, everyone) if text]


def settle(phase: str, failure: BaseException | None, group=None, peer_error: type = PeerFailure):
    """`outcomes`, and `peer_error` on a rank that did not fail when some other rank did.

    A rank that failed gets the list back and re-raises its own error itself (see
    `fail_together`)."""
    failed = outcomes(failure, group)
    if failed and failure is None:
        kind, _, message = failed[0][1].partition(": ")
        if peer_error is not PeerFailure and kind == peer_error.__name__:
            raise peer_error(message)  # the same error, word for word, on every rank
        raise peer_error(peer_message(phase, failed))
    return failed


def peer_message(phase: str, failed: list[tuple[int, str]]) -> str:
    (first, why), others = failed[0], failed[1:]
    also = f" (and {len(others)} more rank{'s' if len(others) > 1 else ''})" if others else ""
    return f"{phase}: rank {first} failed{also} with {why}; this rank stopped there too, so that none waits alone"


class fail_together:  # noqa: N801 - used like a function: `with fail_together("shard()"):`
    """`with fail_together(phase):` around local work that every rank does before a collective.

    Every rank leaves the block together: the ranks that failed with their own
    error, the others with `peer_error`: `PeerFailure`, unless a phase's callers catch
    a class of their own, such as CheckpointError. Then every rank raises that class
    (the failed rank's very message, when it raised that class too), and an `except`
    on every rank takes the same branch. Call it on every rank of `group`.
    """

    def __init__(self, phase: str, group=None, *, peer_error: type = PeerFailure):
        self.phase, self.group, self.peer_error = phase, group, peer_error

    def __enter__(self) -> fail_together:
        return self

    def __exit__(self, kind, error, tb) -> bool:
        settle(self.phase, error, self.group, self.peer_error)
        return False  # this rank's own error, if any, goes on unchanged
