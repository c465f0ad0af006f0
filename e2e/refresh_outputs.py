"""`make notebooks`: run the tutorials and save their outputs, as nbval will compare them.

    .venv/bin/python e2e/refresh_outputs.py [--only 02]

Each tutorial runs top to bottom in a fresh kernel, in the deterministic collated
output mode (`FSDP_NB_COLLATE=1`: rank output ordered by rank, no live widgets), and
is written back with its new outputs. Collated cells draw no widget, so the saved
file carries no widget state; a model that some output still showed would be kept,
and any other dropped (tests/notebook_rules.py checks both). Nothing is written when
a cell that is not tagged `raises-exception` fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from notebook_rules import WIDGET_STATE, reachable_widgets, widget_models  # noqa: E402


def refresh(path: Path) -> float:
    nb = nbformat.read(path, as_version=4)
    start = time.monotonic()
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    plain = json.loads(nbformat.writes(nb))
    keep = reachable_widgets(plain)
    state = {k: v for k, v in widget_models(plain).items() if k in keep}
    plain["metadata"].pop("widgets", None)
    if state:
        plain["metadata"]["widgets"] = {WIDGET_STATE: {"state": state, "version_major": 2, "version_minor": 0}}
    nbformat.write(nbformat.from_dict(plain), path)  # nbformat's own layout: sorted keys, indent 1
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="only tutorials whose name contains this")
    args = parser.parse_args()
    os.environ["FSDP_NB_COLLATE"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        if args.only in path.name:
            print(f"{path.name}: {refresh(path):.0f} s", flush=True)


if __name__ == "__main__":
    main()
