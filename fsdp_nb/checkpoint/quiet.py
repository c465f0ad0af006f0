"""Torch's own warnings, silenced for the duration of our calls into torch and nowhere else.

FSDP1's sharded state dicts are ShardedTensors, which torch 2.13 marks deprecated at
every touch; FSDP1's state-dict helpers also warn about gloo groups that carry a CPU
and a CUDA backend, about a private helper they call themselves, and about their own
`FSDP.state_dict_type`. That is torch talking to itself: one FSDP1 save prints
hundreds of lines, with paths into site-packages, that the user can do nothing about.

`quiet()` hides those messages, and only those, inside a `with` block. Nothing is
installed process-wide: a filter added at import would also hide the same warnings
from the user's own code, and `warnings.filters` would differ from what they set.

One more is logged rather than warned: under tensor parallelism, DTensor notes (once
per mesh and process, on every rank) that gathering a parameter sharded over
(dp_shard, tp) takes two all-gathers, "suboptimal", which a FULL_STATE_DICT save
under TP prints as four lines of torch internals. `quiet()` drops that record from
DTensor's logger for the length of the block, and nothing else it logs (torch then
counts the notice as given: it is about speed, and says nothing of the result).

`warnings.catch_warnings` swaps a process-global list, so two threads inside it at
once can leave each other's filters behind. Only the calling thread of a save or a
load enters it; the background thread of an async save never does (it calls no
torch code that warns: it writes a state that is already taken).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from fsdp_nb._torch import redistribute_logger

# Each a regular expression matched at the start of the message (what `filterwarnings` does).
CHATTER = (
    "Please use DTensor instead and we are deprecating ShardedTensor",
    "Multiple backends are registered with this ProcessGroup",
    "`_get_pg_default_device` will be deprecated",
    r"FSDP\.state_dict_type\(\) and FSDP\.set_state_dict_type\(\) are being deprecated",
    "TypedStorage is deprecated",  # torch 2.10's DCP writer calls Tensor.storage() on what it writes
)
# Logged by DTensor's redistribution (a logging record, not a warning): the start of its message.
LOGGED_CHATTER = ("While redistributing from",)


class _DropChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LOGGED_CHATTER)


def before_background_write() -> None:
    """Spend, here and silenced, the TypedStorage warning that torch gives once per process.

    torch 2.10's DCP writer calls the deprecated `Tensor.storage()` on every tensor it
    writes, and torch warns about that the first time only. An async save writes from
    its own thread, where no filter can be set safely (above); so its first touch is
    made here, on the calling thread inside `quiet()`, and the thread finds it spent.
    From torch 2.13 DCP no longer calls it, and this does nothing.
    """
    if torch.__version__ < "2.13":
        with quiet():
            torch.empty(0).storage()


@contextmanager
def quiet() -> Iterator[None]:
    """Inside the block, torch's CHATTER and LOGGED_CHATTER are not shown; every other warning is."""
    logger, drop = redistribute_logger(), _DropChatter()
    logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            for message in CHATTER:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        logger.removeFilter(drop)
