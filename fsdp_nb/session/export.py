"""Turn a session's history into a script that torchrun runs (pure: text in, text out).

    %fsdp_export train.py
    torchrun --standalone --nproc-per-node 2 train.py

The script's header rebuilds what a session rank starts with (rank, world_size,
device, torch, dist, display) from torchrun's environment; then come the cells that
ran without error, in order. Cells run with --ranks become `if rank in (...)` blocks.
Pushed values are written as literals when their repr reads back to an equal value.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """One history entry: a cell (`source`, `ranks`) or a push (`pushed` name -> value)."""

    source: str | None = None
    ranks: tuple[int, ...] | None = None
    pushed: dict | None = None


def _literal(value) -> str | None:
    text = repr(value)
    try:
        return text if ast.literal_eval(text) == value else None
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def header(*, nprocs: int, device: str, backend: str, timeout: float, threads: int, nnodes: int = 1) -> str:
    sizes = (
        f"--nnodes {nnodes} --nproc-per-node {max(1, nprocs // nnodes)}"
        if nnodes > 1
        else "--nnodes N --nproc-per-node K"
    )
    return f'''\
#!/usr/bin/env python
"""Exported from an fsdp_nb session. Run with, on one machine:
    torchrun --standalone --nproc-per-node {nprocs} THIS_FILE
or on several machines, the same command on each node (HOST: one of the nodes; with SLURM,
srun --nodes N --ntasks-per-node 1 torchrun ...):
    torchrun {sizes} --rdzv-backend c10d --rdzv-endpoint HOST:29400 THIS_FILE
"""
import datetime
import os

import torch
import torch.distributed as dist

rank = int(os.environ["RANK"])
world_size = int(os.environ["WORLD_SIZE"])
local_rank = int(os.environ.get("LOCAL_RANK", rank))
torch.set_num_threads({threads})
if {device!r} == "cuda":
    torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank)
else:
    device = torch.device("cpu")
dist.init_process_group({backend!r}, timeout=datetime.timedelta(seconds={timeout!r}))


def display(*objs):
    for obj in objs:
        print(f"[rank {{rank}}]", obj)
'''


FOOTER = """
# Free FSDP state while the process group exists (gloo can abort at exit otherwise).
import gc

gc.collect()
dist.barrier()
dist.destroy_process_group()
"""


def script(steps: list[Step], **session_options) -> tuple[str, list[str]]:
    """The script text, and warnings about what could not be exported faithfully."""
    parts, warnings = [header(**session_options)], []
    for i, step in enumerate(steps, 1):
        if step.pushed is not None:
            parts.append(f"\n# ---- %fsdp_push {' '.join(step.pushed)} ----")
            for name, value in step.pushed.items():
                lit = _literal(value)
                if lit is None:
                    warnings.append(
                        f"{name} was pushed but its value is not a Python literal; "
                        f"the script sets it to None: rebuild it in a cell"
                    )
                parts.append(f"{name} = {lit if lit is not None else 'None  # FIXME: not a literal'}")
            continue
        body = step.source.rstrip() or "pass"
        parts.append(f"\n# ---- cell {i}{f' (ranks {list(step.ranks)})' if step.ranks else ''} ----")
        if step.ranks:
            parts.append(f"if rank in {tuple(step.ranks)!r}:\n" + textwrap.indent(body, "    "))
        else:
            parts.append(body)
    parts.append(FOOTER)
    text = "\n".join(parts)
    try:
        compile(text, "<exported script>", "exec")
    except SyntaxError as e:  # e.g. IPython-only syntax (!ls, %magic) inside a cell
        warnings.append(
            f"the script does not compile as plain Python (line {e.lineno}: {e.msg}); edit out IPython-only syntax"
        )
    return text, warnings
