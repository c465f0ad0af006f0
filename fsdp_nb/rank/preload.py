"""What the fork server imports before it forks ranks, and its check that forking stays safe.

The kernel's fork server (`fsdp_nb.session.forkserver`) imports this module once, when it
starts: torch, torch.distributed and the worker, the seconds a spawned rank would spend
importing them. A fork copies only the calling thread and everything in memory, so the
server must reach its accept loop as a plain single-threaded process: no thread, no
CUDA context, no process group. Imports alone give that ([Note: fork safety] in
`fsdp_nb.session.forkserver`); this module checks it instead of trusting it, and a
server that fails the check exits, saying why on stderr, so the kernel falls back to
spawning ranks. The check runs only in the server (FORKSERVER_MARK in its environment),
never where the module is merely imported.
"""

from __future__ import annotations

import os
import sys
import threading

import torch
import torch.distributed

import fsdp_nb.rank.worker  # noqa: F401  (the fork target, unpickled by every rank)
from fsdp_nb.session.protocol import FORKSERVER_MARK


def thread_count() -> int:
    """OS threads of this process (native ones included), or Python's count where /proc is missing."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def problems() -> list[str]:
    """Why forking this process would not be safe; empty when it is."""
    found = []
    threads = thread_count()
    if threads != 1:
        found.append(f"{threads} threads after importing torch")
    if torch.cuda.is_initialized():
        found.append("CUDA is initialised")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        found.append("a process group exists")
    return found


if os.environ.get(FORKSERVER_MARK) == "1":
    _found = problems()
    if _found:
        print(f"fsdp_nb: the fork server cannot fork safely ({'; '.join(_found)}); it exits", file=sys.stderr)
        sys.stderr.flush()
        os._exit(3)
