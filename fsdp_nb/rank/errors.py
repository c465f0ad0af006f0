"""A rank's exception as the user should read it: their frames, short paths, each explanation once.

- Frames above the cell (the worker loop, `exec`) and fsdp_nb's own rank machinery
  below it (the SIGINT handler that raises KeyboardInterrupt) are dropped, as IPython
  drops its own.
- Paths are shortened: `site-packages/torch/...` instead of the interpreter's
  absolute path, `fsdp_nb/sharding.py` instead of the checkout's, so a saved notebook
  shows no path of the machine that ran it, and a reader sees what matters.
- "fsdp_nb explains" is added only to errors fsdp_nb did not word itself: an error
  fsdp_nb raises explains itself, and keeps torch's own error as its cause, once.
"""

from __future__ import annotations

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
    """The user's view of an exception: frames from the cell down, none of the worker's."""
    tb = e.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell"):
        tb = tb.tb_next  # drop worker/run_source frames above the cell
    report = traceback.TracebackException(type(e), e, tb)
    report.stack = traceback.StackSummary.from_list(
        [frame for frame in report.stack if not frame.filename.startswith(_MACHINERY)]
    )
    msg = str(e)
    text = shorten_paths("".join(report.format()))
    why = None if _worded_by_fsdp_nb(e) else _explain(msg)
    if why:
        text += f"fsdp_nb explains: {why}\n"
    stuck = type(e).__name__ in ("DistBackendError", "DistNetworkError") or (
        isinstance(e, RuntimeError) and any(m in msg.lower() for m in _TIMEOUT_MARKERS)
    )
    return P.RemoteError(type(e).__name__, msg.strip().splitlines()[0] if msg.strip() else "", text, stuck)


def _worded_by_fsdp_nb(e: BaseException) -> bool:
    """True if fsdp_nb raised it: its message already explains (frames of the library, not the machinery)."""
    tb, last = e.__traceback__, None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and last.startswith(_PACKAGE + os.sep) and not last.startswith(_MACHINERY)


def _explain(message: str) -> str | None:
    if "flatten" not in message and "FSDP" not in message and "scalar" not in message:
        return None  # most errors: skip importing the rules
    from fsdp_nb.layout.rules import explain

    return explain(message)
