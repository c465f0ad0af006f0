"""Kernel-side rendering of what ranks send: streamed text, rich displays and results.

Two modes:
- live (default): each complete line is printed as it arrives, prefixed `[rank N] `;
- collated (`--collate`, or FSDP_NB_COLLATE=1): everything is held and printed at the
  end of the cell, rank 0's block first. Deterministic, so tests and nbval use it.

Prefixes go on every line, in both modes, so output reads the same either way.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict


def collate_default() -> bool:
    """FSDP_NB_COLLATE=1 makes collated output the default."""
    return os.environ.get("FSDP_NB_COLLATE", "").strip().lower() in ("1", "true", "yes", "on")


def show_bundle(data: dict, metadata: dict | None = None) -> None:
    """Show a MIME bundle in the notebook, or its text in a terminal."""
    try:
        from IPython import get_ipython
        from IPython.display import display

        if get_ipython() is not None:
            display(data, raw=True, metadata=metadata or {})
            return
    except ImportError:
        pass
    print(data.get("text/plain", f"<{', '.join(sorted(data))}>"))


class LivePrinter:
    """Prints each rank's lines as they arrive. Partial lines wait for their newline."""

    def __init__(self, stdout=None, stderr=None):
        self._out = {"stdout": stdout, "stderr": stderr}
        self._partial: dict[tuple[int, str], str] = defaultdict(str)

    def _stream_for(self, name: str):
        chosen = self._out.get(name)
        return chosen if chosen is not None else (sys.stderr if name == "stderr" else sys.stdout)

    def stream(self, rank: int, name: str, text: str) -> None:
        key = (rank, name)
        text = self._partial.pop(key, "") + text
        *lines, rest = text.split("\n")
        if rest:
            self._partial[key] = rest
        if lines:
            out = self._stream_for(name)
            out.write("".join(f"[rank {rank}] {line}\n" for line in lines))
            out.flush()

    def display(self, rank: int, data: dict, metadata: dict) -> None:
        self._flush_partial(rank)
        out = self._stream_for("stdout")
        out.write(f"[rank {rank}] display:\n")
        out.flush()
        show_bundle(data, metadata)

    def _flush_partial(self, rank: int | None = None) -> None:
        for key in sorted(k for k in self._partial if rank is None or k[0] == rank):
            r, name = key
            out = self._stream_for(name)
            out.write(f"[rank {r}] {self._partial.pop(key)}\n")
            out.flush()

    def finish(self) -> None:
        self._flush_partial()


class CollatedPrinter(LivePrinter):
    """Holds everything until the cell ends, then prints rank by rank."""

    def __init__(self, stdout=None, stderr=None):
        super().__init__(stdout, stderr)
        self._items: dict[int, list[tuple]] = defaultdict(list)

    def stream(self, rank: int, name: str, text: str) -> None:
        self._items[rank].append(("stream", name, text))

    def display(self, rank: int, data: dict, metadata: dict) -> None:
        self._items[rank].append(("display", data, metadata))

    def finish(self) -> None:
        live = LivePrinter(self._out["stdout"], self._out["stderr"])
        for rank in sorted(self._items):
            for kind, a, b in self._items[rank]:
                live.stream(rank, a, b) if kind == "stream" else live.display(rank, a, b)
            live._flush_partial(rank)
        self._items.clear()


class Silent:
    """Drops text: used by helpers that only want values (Session.eval)."""

    def stream(self, rank, name, text):
        pass

    def display(self, rank, data, metadata):
        pass

    def finish(self):
        pass


def printer(collate: bool | None = None):
    return CollatedPrinter() if (collate_default() if collate is None else collate) else LivePrinter()


_RICH = ("_repr_html_", "_repr_png_", "_repr_svg_", "_repr_mimebundle_", "_repr_markdown_", "_repr_latex_")


def show_value(rank: int, value) -> None:
    """Show one rank's cell result, labelled: plain values as text, rich ones through display()."""
    if any(hasattr(value, name) for name in _RICH) or type(value).__name__ == "Figure":
        print(f"Out[rank {rank}]:")
        try:
            from IPython.display import display

            display(value)
            return
        except ImportError:
            pass
    try:
        from IPython.lib.pretty import pretty

        text = pretty(value)
    except ImportError:
        text = repr(value)
    print(f"Out[rank {rank}]: {text}")
