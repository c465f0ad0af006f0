"""Peak memory of each tutorial: the kernel and its ranks together, against Binder's ~2 GB.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/notebook_memory.py [--only 05]

Runs every notebook under nbclient (as nbval does) and samples, every 0.1 s, the
proportional set size (PSS: resident memory, with pages shared between processes,
such as torch's libraries, split among them, so the sum is what the machine holds)
of the kernel process and all its descendants (the ranks), summed. Reported: the peak per tutorial, and the kernel alone before any rank
starts, as the baseline measured in the same run.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def tree_rss(pid: int) -> int:
    """Bytes of `pid` and every process below it (PSS: shared pages counted once, split among sharers)."""
    tree, todo, total = _children(), [pid], 0
    while todo:
        p = todo.pop()
        try:
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text()
            total += int(next(ln for ln in rollup.splitlines() if ln.startswith("Pss:")).split()[1]) * 1024
        except (OSError, StopIteration, IndexError, ValueError):
            continue
        todo.extend(tree.get(p, []))
    return total


def measure(path: Path) -> tuple[int, int]:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    peak, baseline, done = [0], [0], threading.Event()

    def sample():
        while not done.is_set():
            km = client.km
            if km is not None and km.has_kernel and km.provisioner and km.provisioner.pid:
                rss = tree_rss(km.provisioner.pid)
                baseline[0] = baseline[0] or rss
                peak[0] = max(peak[0], rss)
            time.sleep(0.1)

    threading.Thread(target=sample, daemon=True).start()
    try:
        client.execute()
    finally:
        done.set()
    return peak[0], baseline[0]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="", help="run only the tutorials whose file name contains this")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["FSDP_NB_COLLATE"] = "1"
    for path in sorted(p for p in (ROOT / "notebooks").glob("*.ipynb") if args.only in p.name):
        peak, base = measure(path)
        print(
            f"{path.name:<40} peak {peak / 2**20:7.0f} MiB (kernel and ranks; a fresh kernel: {base / 2**20:.0f} MiB)"
        )
