"""`save_checkpoint`: sharded (every rank writes its shard) or full (rank 0 writes one file), now or in the background.

The order of one save, and why:
1. rank 0 checks the path (only an older checkpoint, or nothing, may stand there),
   makes the temporary directory and shares its name, or why it could not, so all
   ranks write to the same place or all raise [Note: atomic publication];
2. the state is taken: this rank's shards (no communication), or the whole state
   gathered to rank 0;
3. for `async_save=True` the state is copied, so training can change the
   parameters while the copy is written; a thread does the rest, on a gloo group of
   its own (on the default group, the checkpoint's collectives would interleave
   with training's and hang);
   for a Transformers model, its config is recorded for the manifest, and a tokenizer, if
   given, is written by rank 0 into the temporary directory now: both as of the call;
4. every rank writes (DCP for sharded, `torch.save` on rank 0 for full);
5. rank 0 writes the manifest and renames the directory into place, then tells the
   other ranks how that went, which is also the barrier that ends the save.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fsdp_nb.checkpoint import state as S
from fsdp_nb.checkpoint import store
from fsdp_nb.checkpoint.quiet import before_background_write, quiet
from fsdp_nb.checkpoint.store import CheckpointError
from fsdp_nb.hf import export
from fsdp_nb.phases import describe, outcomes
from fsdp_nb.rank import events, pending
from fsdp_nb.sharding import config_of, fsdp_version_of

KINDS = ("SHARDED_STATE_DICT", "FULL_STATE_DICT")
_pending: AsyncCheckpoint | None = None  # at most one background save per process at a time
# (the default process group, the checkpoint's own gloo group made for it). The default group is
# held, not its id: after destroy_process_group and a new init, a new group may get the old id.
_group: tuple[object, object] | None = None


class AsyncCheckpoint:
    """A checkpoint being written in the background: `.wait()` for it, `.done()` to ask.

    The writing thread is a daemon, so a stuck write can never keep a process alive
    forever; every way a process ends waits for it first, up to a bound
    (`fsdp_nb.rank.pending`): a session's shutdown, restart and the kernel's death, and
    the end of a script.
    """

    def __init__(self, path: Path, write):
        self.path, self.error, self.seconds = path, None, None
        self.what = f"checkpoint {path}"
        self.reported = False  # its error was raised to the caller once: not again by a later save
        self._finished = threading.Event()  # set by the thread itself: an interrupted join cannot fake it
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._run, args=(write,), name=f"fsdp_nb-save {path.name}", daemon=True)
        pending.add(self)
        self._thread.start()

    def _run(self, write) -> None:
        try:
            write()
        except BaseException as e:  # CheckpointException is a BaseException
            self.error = e
        self.seconds = time.perf_counter() - self._start
        self._finished.set()
        pending.discard(self)
        _report(self.path, "failed" if self.error else "saved", self.seconds, background=True)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread, without raising its error (`pending.finish` uses this)."""
        self._finished.wait(timeout)

    def done(self) -> bool:
        """True once the checkpoint is written (or has failed: `.wait()` raises then)."""
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> Path:
        """Block until the checkpoint stands at `path`; returns it, or raises what went wrong."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"checkpoint {self.path} is still being written after {timeout} s")
        if self.error is not None:
            self.reported = True
            raise self.error
        return self.path

    def __repr__(self) -> str:
        if not self.done():
            return f"<AsyncCheckpoint {self.path.name}: writing for {time.perf_counter() - self._start:.1f} s>"
        if self.error is not None:
            return f"<AsyncCheckpoint {self.path.name}: failed: {self.error}>"
        return f"<AsyncCheckpoint {self.path.name}: saved in {self.seconds:.2f} s>"


def save_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    path: str | os.PathLike,
    *,
    state_dict_type: str | None = None,
    async_save: bool = False,
    extra: dict | None = None,
    tokenizer=None,
) -> AsyncCheckpoint | None:
    """Save `model` (and `optimizer`, which may be None) to the directory `path`; call it on every rank.

    `state_dict_type` is Accelerate's "SHARDED_STATE_DICT" (each rank writes its own
    shard, no communication) or "FULL_STATE_DICT" (gathered to rank 0, one file);
    None takes it from the `FSDPConfig` the model was sharded with, else sharded.
    Returns None once the checkpoint is written, or with `async_save=True` an
    `AsyncCheckpoint` as soon as the state is copied. `extra` is a JSON-able dict
    kept in the manifest (the Trainer keeps its step there), copied at the call. An
    existing checkpoint at `path` is replaced only once the new one is complete;
    anything else at `path` is refused. A failure on any rank raises on every rank.

    For a Transformers model (plain, sharded, or a PEFT model around one) the manifest
    records its config and any PEFT adapter configs, so that `merge_weights` writes a
    directory `from_pretrained` loads. A `tokenizer` (anything with `save_pretrained`)
    is saved inside the checkpoint, in `tokenizer/`, checksummed like the weights.
    """
    kind = _kind(model, state_dict_type)
    path = Path(path).absolute()
    extra = json.loads(json.dumps(extra or {}))  # a copy as of now: the caller may go on changing it
    wait_pending()  # background saves share one group: one at a time
    rank, world = S.rank_and_world()
    token, problem = _prepare_safely(path) if rank == 0 else (None, None)
    token, problem = from_rank0((token, problem))  # every rank learns rank 0's verdict: none waits alone
    if problem:
        raise CheckpointError(problem)
    tmp = store.temporary_dir(path, token)
    t0 = time.perf_counter()
    state, failure, hf = None, None, None
    try:
        state = S.sharded_state(model, optimizer) if kind == KINDS[0] else S.full_state(model, optimizer)
        snapshot = S.clone_local(state) if async_save else state  # training may change the parameters from here
        if rank == 0:
            hf = export.record(model)  # None unless a Transformers model (fsdp_nb.hf.detect: no import)
            if tokenizer is not None:
                _save_tokenizer(tokenizer, tmp / store.TOKENIZER_DIR)
    except BaseException as e:
        failure = describe(e)
    failures = outcomes(failure, None)
    if failures:
        if rank == 0:
            store.discard(tmp)
        where = "; ".join(f"rank {r}: {why}" for r, why in failures)
        raise CheckpointError(f"saving checkpoint {path} failed ({where}); nothing was written")
    info = dict(
        state_dict_type=kind,
        model=S.shapes(state["model"]) if state is not None else {},
        has_optimizer=optimizer is not None,
        saved_by={"fsdp_version": fsdp_version_of(model), "world_size": world, "torch": torch.__version__},
        extra=extra,
        hf=hf,
    )
    if not async_save:
        _write(state, tmp, path, info, group=None)
        _report(path, "saved", time.perf_counter() - t0)
        return None
    global _pending
    before_background_write()
    _pending = AsyncCheckpoint(path, functools.partial(_write, snapshot, tmp, path, info, group=_checkpoint_group()))
    _report(path, "writing", time.perf_counter() - t0, background=True)
    return _pending


def wait_pending() -> None:
    """Wait for this process's background save, if one is running (an interrupted wait keeps it pending)."""
    global _pending
    pending = _pending
    if pending is None:
        return
    if pending.done() and pending.reported:  # its error already reached the caller
        _pending = None
        return
    try:
        pending.wait()
    finally:
        if pending.done():
            _pending = None


def _save_tokenizer(tokenizer, directory: Path) -> None:
    """Rank 0: the tokenizer's own `save_pretrained` files, synced, before the manifest lists them."""
    if not callable(getattr(tokenizer, "save_pretrained", None)):
        raise TypeError(f"tokenizer={type(tokenizer).__name__} has no save_pretrained; pass a Transformers "
                        "tokenizer (PreTrainedTokenizerFast, AutoTokenizer...) or leave it out")  # fmt: skip
    tokenizer.save_pretrained(str(directory))
    store.sync_tree(directory)


def _prepare(path: Path) -> tuple[str, str | None]:
    """Rank 0: a name for the temporary directory, made; or why nothing can be saved at `path`."""
    if path.exists() and not store.is_checkpoint(path) and not (path.is_dir() and not any(path.iterdir())):
        what = "a file" if not path.is_dir() else "a directory that is not a checkpoint"
        return "", f"{path} is {what}; a save replaces only an older checkpoint: choose another path"
    token = store.token()
    try:
        store.temporary_dir(path, token).mkdir(parents=True)
    except OSError as e:
        return "", f"cannot save a checkpoint at {path}: {e.strerror or e}"
    return token, None


def _prepare_safely(path: Path) -> tuple[str, str | None]:
    """`_prepare`, whose every failure becomes the problem rank 0 shares: the others wait in that broadcast."""
    try:
        return _prepare(path)
    except Exception as e:  # a directory we may not list, a path too long, ...
        return "", f"cannot save a checkpoint at {path}: {describe(e)}"


def from_rank0(value):
    box = [value]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _kind(model: nn.Module, state_dict_type: str | None) -> str:
    if state_dict_type is None:
        config = config_of(model)
        return config.state_dict_type if config is not None else KINDS[0]
    kind = str(state_dict_type).strip().upper()
    if kind not in KINDS:
        raise ValueError(f"state_dict_type={state_dict_type!r} is not valid; accepted: {', '.join(KINDS)}")
    return kind


def _write(state: dict | None, tmp: Path, path: Path, info: dict, *, group) -> None:
    """Steps 4 and 5 of a save, on every rank; `group` is None (default) or the checkpoint's own."""
    rank, _ = S.rank_and_world()
    failure = None
    try:
        # torch's own chatter about FSDP1's sharded tensors is hidden on the calling thread only:
        # catch_warnings is process-wide, so a background write leaves it alone.
        in_main = threading.current_thread() is threading.main_thread()
        with quiet() if in_main else contextlib.nullcontext():
            if info["state_dict_type"] == KINDS[0]:
                import torch.distributed.checkpoint as dcp

                writer = dcp.FileSystemWriter(str(tmp), overwrite=False)
                dcp.save(state, storage_writer=writer, process_group=group)  # returns once every rank has written
            elif rank == 0:
                with open(tmp / store.FULL_FILE, "wb") as f:
                    torch.save(state, f)
                    f.flush()
                    os.fsync(f.fileno())
        if rank == 0:
            if not info["model"] and state is not None:
                info["model"] = S.shapes(state["model"])
            store.write_manifest(tmp, **info)
            store.publish(tmp, path)
    except BaseException as e:  # dcp's CheckpointException is a BaseException; so is a KeyboardInterrupt
        failure = describe(e)
    failures = outcomes(failure, group)
    if failures:
        if rank == 0:
            store.discard(tmp)
        where = "; ".join(f"rank {r}: {why}" for r, why in failures)
        raise CheckpointError(f"saving checkpoint {path} failed ({where}); nothing was published and older "
                              "checkpoints are untouched")  # fmt: skip


def _checkpoint_group():
    """A gloo group for background saves, made once per process group (all ranks call this together)."""
    global _group
    if not dist.is_initialized():
        return None
    world = dist.group.WORLD
    if _group is None or _group[0] is not world:
        _group = (world, dist.new_group(backend="gloo"))
    return _group[1]


def _report(path: Path, status: str, seconds: float, background: bool = False) -> None:
    """Rank 0 tells the notebook (a status line there); outside a session it stays quiet."""
    if S.rank_and_world()[0] == 0:
        events.emit("checkpoint", path=str(path), status=status, seconds=round(seconds, 3), background=background)
