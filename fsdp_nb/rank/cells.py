"""Rank-side input/output helpers: running cell source, capturing output, formatting errors.

Kept apart from worker.py's process plumbing so each piece can be tested in-process.
"""

from __future__ import annotations

import ast
import base64
import io
import linecache
import threading

from fsdp_nb.rank.errors import shorten_paths
from fsdp_nb.session import protocol as P

FLUSH_BYTES = 8192


def run_source(source: str, filename: str, ns: dict):
    """Exec `source` in `ns`; return the value of a trailing expression (None if the cell ends in ';')."""
    # Registering the source lets remote tracebacks show the cell's own lines.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    tree = ast.parse(source, filename)
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr) and not source.rstrip().endswith(";"):
        last = ast.Expression(tree.body.pop().value)
    if tree.body:
        exec(compile(tree, filename, "exec"), ns)
    return eval(compile(last, filename, "eval"), ns) if last is not None else None


class RankStream(io.TextIOBase):
    """sys.stdout / sys.stderr on a rank: lines go to the kernel as Stream messages.

    Text is sent at each newline or carriage return (live streaming), when
    FLUSH_BYTES accumulate, on flush(), and at the end of every request.
    """

    def __init__(self, name: str, state):
        self.name, self._state = name, state
        self._buf: list[str] = []
        self._size = 0
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:
        return "utf-8"

    def isatty(self) -> bool:
        return False

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        with self._lock:
            self._buf.append(s)
            self._size += len(s)
            if "\n" in s or "\r" in s or self._size >= FLUSH_BYTES:
                self._flush_locked()
        return len(s)

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self._buf:
            text = shorten_paths("".join(self._buf)) if self.name == "stderr" else "".join(self._buf)
            self._buf.clear()
            self._size = 0
            self._state.send(P.Stream(self._state.request_id, self._state.rank, self.name, text))


def mime_bundle(obj) -> tuple[dict, dict]:
    """A JSON-ready MIME bundle for `obj`: PNG for matplotlib figures, IPython's formatters otherwise."""
    if type(obj).__name__ == "Figure" and hasattr(obj, "savefig"):
        buf = io.BytesIO()
        obj.savefig(buf, format="png", bbox_inches="tight")
        return {"image/png": base64.b64encode(buf.getvalue()).decode("ascii"), "text/plain": repr(obj)}, {}
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and "/" in k for k in obj):
        return dict(obj), {}  # already a bundle
    from IPython.core.formatters import DisplayFormatter  # imported only when a rank displays

    data, metadata = DisplayFormatter().format(obj)
    for key, value in data.items():
        if isinstance(value, bytes):
            data[key] = base64.b64encode(value).decode("ascii")
    return data, metadata
