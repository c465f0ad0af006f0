"""`load_checkpoint`: into an already sharded model, of either FSDP version, at any world size.

A sharded checkpoint is read with DCP into this rank's own shards: DCP reads the
slices each shard needs from whichever files hold them, which is why the world
size and the FSDP version at save time do not matter. A full checkpoint is read
by rank 0 and broadcast. Before anything is read, the manifest is checked: an
incomplete checkpoint, a path that is not one, or a model whose names or shapes
differ each stop the load with one line that says so.

Then the files' checksums [Note: checksums] are verified, the work split across
ranks: rank r hashes every world-size-th file (in name order), and the ranks agree
on the outcome. Each byte is hashed once however many ranks there are, and a
damaged file found by one rank is a CheckpointError on all of them, at once: no
rank goes on into DCP's collectives while another has stopped.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from fsdp_nb.checkpoint import state as S
from fsdp_nb.checkpoint import store
from fsdp_nb.checkpoint.quiet import quiet
from fsdp_nb.checkpoint.save import from_rank0, wait_pending
from fsdp_nb.checkpoint.store import CheckpointError, Manifest
from fsdp_nb.phases import fail_together


def load_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer | None, path: str | os.PathLike, *,
                    verify: bool = True) -> Manifest:  # fmt: skip
    """Load the checkpoint at `path` into `model` (and `optimizer`, which may be None); call it on every rank.

    Reads both kinds (SHARDED_STATE_DICT, FULL_STATE_DICT). Returns the checkpoint's
    manifest (`.extra` holds what was stored beside the state). Raises
    CheckpointError, naming the path, for an incomplete checkpoint, a path that is
    not a checkpoint, or a model whose parameter names or shapes differ; and,
    unless `verify=False`, naming the file whose bytes differ from those saved
    (checkpoints saved before checksums were recorded are checked by size only).
    """
    wait_pending()  # a background save of this process must finish before its files are read
    # Local checks, which can fail on some ranks only (a path one node cannot see, a file that
    # one rank finds damaged): every rank raises a CheckpointError, or none goes on [Note: fail together].
    with fail_together("load_checkpoint", peer_error=CheckpointError):
        manifest = store.inspect(path)
        if optimizer is not None and not manifest.has_optimizer:
            raise CheckpointError(f"checkpoint {manifest.path} holds no optimizer state; pass optimizer=None")
        if verify:
            _verify_my_share(manifest)
    if manifest.state_dict_type == "SHARDED_STATE_DICT":
        import torch.distributed.checkpoint as dcp

        state = S.sharded_state(model, optimizer)
        _check(manifest, S.shapes(state["model"]))
        try:
            with quiet():  # DCP's planner touches FSDP1's ShardedTensors: deprecation chatter
                dcp.load(state, storage_reader=dcp.FileSystemReader(str(manifest.path)))
        except BaseException as e:  # CheckpointException is a BaseException
            raise CheckpointError(f"reading checkpoint {manifest.path} failed: {first_line(e)}") from None
        S.load_sharded_into(model, optimizer, state)
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        with quiet():
            wanted = get_model_state_dict(model, options=StateDictOptions(full_state_dict=False))
        _check(manifest, S.shapes(wanted))
        full, problem = None, None
        if S.rank_and_world()[0] == 0:
            try:
                full = torch.load(manifest.path / store.FULL_FILE, map_location="cpu", weights_only=True)
            except Exception as e:  # a damaged file: every rank must hear it, or the others wait forever
                problem = f"reading checkpoint {manifest.path} failed: {first_line(e)}"
        problem = from_rank0(problem)
        if problem:
            raise CheckpointError(problem)
        S.load_full_into(model, optimizer, full)
    return manifest


def _verify_my_share(manifest: Manifest) -> None:
    """This rank hashes every world-size-th file (in name order): each byte is hashed once, whatever
    the number of ranks; the ranks then agree on the outcome (the caller's phase)."""
    rank, world = S.rank_and_world()
    threads = max(1, (os.cpu_count() or 1) // world)  # the ranks of one machine share its cores
    problem = store.damaged(manifest, sorted(manifest.sha256)[rank::world], threads)
    if problem:
        raise CheckpointError(problem)


def _check(manifest: Manifest, wanted: dict[str, tuple]) -> None:
    problem = S.mismatch(manifest.model, wanted)
    if problem:
        raise CheckpointError(f"checkpoint {manifest.path} does not match the model: {problem}")


def first_line(e: BaseException) -> str:
    """An exception as one line; for DCP's CheckpointException, the first failing rank's own exception."""
    failures = getattr(e, "failures", None)
    if failures:
        rank, inner = sorted(failures.items())[0]
        return f"rank {rank}: {first_line(getattr(inner, 'exc', inner))}"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint, or the latest complete checkpoint in a directory of them (for resuming)."""
    found = store.latest(path)
    if found is None:
        store.inspect(path)  # raises the precise reason
    return found
