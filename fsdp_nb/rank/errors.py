"""A rank's exception as the user should read it: their frames, short paths, each explanation once.

- Frames above the cell (the worker loop, `exec`) and fsdp_nb's own rank machinery
  below it (the SIGINT handler that raises KeyboardInterrupt) are dropped, as IPython
  drops its own.
- Paths are shortened: `site-packages/torch/...` instead of the interpreter's
  absolute path, `fsdp_nb/sharding.py` instead of the checkout's, so a saved notebook
  shows no path of the machine that ran it, and a reader sees what matters.
- An error fsdp_nb recognises also gets a short form (`RemoteError.short`), which the
  notebook shows instead of the traceback: a known FSDP refusal that `layout.rules`
  explains, or an error fsdp_nb raised in its own words. Only this process holds the
  exception object, so only here can it be told apart (see [Note: short errors]).

[Note: short errors]
A torch refusal is ten frames of torch internals above one line that matters, and
the user can act on none of those frames: the short form keeps the user's own line
that raised, torch's line (in the header; or as the cause, when fsdp_nb re-worded
it), and the explanation, each once. The whole traceback stays in
`RemoteError.traceback` for `%fsdp_tb`. An error fsdp_nb does not recognise is shown
whole, since any frame may be the one that matters.

"Raised by fsdp_nb in its own words" means: the frame that raised is fsdp_nb's
library (not the rank machinery), at a `raise Something(...)` statement. A KeyError
or a failed `assert` inside fsdp_nb is a bug, not a message, and is shown whole.
"""

from __future__ import annotations

import linecache
import os
import re
import sys
import sysconfig
import traceback

from fsdp_nb.session import protocol as P

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../fsdp_nb
_MACHINERY = os.path.join(_PACKAGE, "rank") + os.sep  # the worker, cells, errors: never the user's business
_TIMEOUT_MARKERS = ("timed out", "timeout", "connection closed by peer", "connection reset by peer")


def _prefixes() -> list[tuple[str, str]]:
    """(absolute prefix, short form), longest first, so site-packages wins over the interpreter's prefix."""
    pairs = {os.path.dirname(_PACKAGE) + os.sep: ""}
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            pairs[path + os.sep] = "site-packages/"
    stdlib = sysconfig.get_paths().get("stdlib")
    if stdlib:
        pairs[stdlib + os.sep] = "python/"
    pairs[sys.prefix + os.sep] = "python/"
    return sorted(pairs.items(), key=lambda kv: -len(kv[0]))


_SHORT = _prefixes()
# Only where a path starts (not inside a longer path such as /data/work/...).
_PATTERN = re.compile(r"(?<![\w./~-])(?:" + "|".join(re.escape(prefix) for prefix, _ in _SHORT) + ")")
_LOOKUP = dict(_SHORT)


def shorten_paths(text: str) -> str:
    """The same text with this machine's install and checkout paths cut to their meaningful tail."""
    return _PATTERN.sub(lambda m: _LOOKUP[m.group(0)], text)


def format_error(e: BaseException) -> P.RemoteError:
    """The user's view of an exception: frames from the cell down, none of the worker's; and the short
    form when fsdp_nb recognises the error."""
    tb = e.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell"):
        tb = tb.tb_next  # drop worker/run_source frames above the cell
    report = traceback.TracebackException(type(e), e, tb)
    report.stack = traceback.StackSummary.from_list(
        [frame for frame in report.stack if not frame.filename.startswith(_MACHINERY)]
    )
    msg = str(e)
    lines = [line for line in msg.strip().splitlines() if line.strip()]
    text = shorten_paths("".join(report.format()))
    stuck = type(e).__name__ in ("DistBackendError", "DistNetworkError") or (
        isinstance(e, RuntimeError) and any(m in msg.lower() for m in _TIMEOUT_MARKERS)
    )
    error = P.RemoteError(type(e).__name__, lines[0] if lines else "", text, stuck)
    worded = _worded_by_fsdp_nb(e)
    why = None if worded else _explain(msg)
    if worded or why:
        cause = e.__cause__ if worded else None
        quoted = cause is not None and str(cause) in msg  # TorchInternalsError already names its AttributeError
        error.short = tuple(
            line
            for line in (
                *lines[1:],  # the header shows the first line only
                _user_line(report.stack),
                _cause(cause) if cause is not None and not quoted else "",
                f"fsdp_nb explains: {why}" if why else "",
            )
            if line
        )
    return error


def _last_frame(e: BaseException) -> tuple[str, int] | None:
    """(file, line) where `e` was raised: the deepest frame of its traceback."""
    tb, last = e.__traceback__, None
    while tb is not None:
        last = (tb.tb_frame.f_code.co_filename, tb.tb_lineno)
        tb = tb.tb_next
    return last


def _worded_by_fsdp_nb(e: BaseException) -> bool:
    """True if fsdp_nb's library raised it with a `raise X(...)` of its own: its message already explains."""
    last = _last_frame(e)
    if last is None or not last[0].startswith(_PACKAGE + os.sep) or last[0].startswith(_MACHINERY):
        return False
    # A re-raise keeps the deepest frame where the error was first raised, so this is fsdp_nb's own raise.
    return linecache.getline(*last).lstrip().startswith("raise ")


def _user_line(stack: traceback.StackSummary) -> str:
    """`<cell 8>, line 3: FSDP(layer, ...)`: the deepest frame of the user's own code, or ''."""
    for frame in reversed(stack):
        if _is_users(frame.filename):
            code = next(iter((frame.line or "").strip().splitlines()), "")
            if frame.end_lineno is not None and frame.end_lineno > frame.lineno:
                code += " ..."  # a statement over several lines: its first line names the call
            where = f"{shorten_paths(frame.filename)}, line {frame.lineno}"
            return f"{where}: {code}" if code else where  # no source: a file since deleted
    return ""


def _is_users(filename: str) -> bool:
    """A cell, or a file of the user's: not the interpreter's, an installed package's, or fsdp_nb's."""
    if filename.startswith("<"):
        return filename.startswith("<cell")
    return not filename.startswith(_PACKAGE + os.sep) and not any(
        filename.startswith(prefix) for prefix, short in _SHORT if short
    )


def _cause(cause: BaseException) -> str:
    """The error fsdp_nb re-worded, as one line: `torch said: ValueError: ...` (unless the message quotes it)."""
    lines = str(cause).strip().splitlines()
    said = f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__
    last = _last_frame(cause)
    from_torch = last is not None and f"{os.sep}torch{os.sep}" in last[0]
    return f"{'torch said' if from_torch else 'because of'}: {said}"


def _explain(message: str) -> str | None:
    if "flatten" not in message and "FSDP" not in message and "scalar" not in message:
        return None  # most errors: skip importing the rules
    from fsdp_nb.layout.rules import explain

    return explain(message)
