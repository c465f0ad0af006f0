"""`load_pretrained`: a `save_pretrained` directory as a model ready for `shard()`.

    model = load_pretrained("merged/", fsdp)   # real on rank 0; on meta elsewhere with cpu_ram_efficient_loading
    model = shard(model, fsdp)                 # shards filled by broadcast from rank 0

With `cpu_ram_efficient_loading=True`, as in Accelerate, rank 0 alone reads the files
(`AutoModelForCausalLM.from_pretrained`) and the other ranks build the same architecture
on the meta device from the directory's `config.json`: shapes, no memory. `shard()` then
broadcasts rank 0's weights (`fsdp_nb.loading`), so one copy of the model is ever read
and held in full. Without it every rank reads the files.

Local directories only (`local_files_only=True`): nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fsdp_nb.phases import fail_together

PHASE = "load_pretrained"


def load_pretrained(path: str | os.PathLike, fsdp_config, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM saved at `path` (a `save_pretrained` or `merge_weights` directory), for `shard(model,
    fsdp_config)`; call it on every rank.

    The weights are in `dtype`, fp32 by default (what FSDP's mixed precision expects as the master
    copy), whatever the directory's config says. With `fsdp_config.cpu_ram_efficient_loading` only
    rank 0 reads the files and the other ranks hold the model on the meta device until `shard()`.
    A path that is missing or is not such a directory raises on every rank, in one line naming it.
    """
    path = Path(path)
    rank = dist.get_rank() if dist.is_initialized() else 0
    empty = bool(getattr(fsdp_config, "cpu_ram_efficient_loading", False)) and rank != 0
    with fail_together(PHASE):  # a rank that cannot read the path must not leave the others in shard()'s collectives
        _check(path)
        return _on_meta(path, dtype) if empty else _read(path, dtype)


def _check(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"load_pretrained: {path} does not exist; pass a local directory written by "
                                "save_pretrained or merge_weights")  # fmt: skip
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise ValueError(f"load_pretrained: {path} holds a PEFT adapter, not a model; load its base model, then "
                         "peft.PeftModel.from_pretrained(model, path)")  # fmt: skip
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"load_pretrained: {path} has no config.json; pass a local directory written by "
                                "save_pretrained or merge_weights")  # fmt: skip


def _read(path: Path, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        with _no_progress_bar():
            return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except OSError as e:  # no weights file, an unreadable one: Transformers' words, on one line
        raise OSError(f"load_pretrained: {path}: {' '.join(str(e).split())}") from None


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """Transformers' "Loading weights" bar off for the call: on a rank it is a line of carriage returns per
    load in the cell's output, with a speed in it, and a local read needs no progress report."""
    from transformers.utils import logging

    was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            logging.enable_progress_bar()


def _on_meta(path: Path, dtype: torch.dtype) -> nn.Module:
    """The architecture of `path` with no storage: parameters and buffers on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
