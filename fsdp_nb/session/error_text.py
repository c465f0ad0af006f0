"""How one rank error reads in a notebook: short when fsdp_nb explains it, whole otherwise, wrapped.

The short form, in reading order, each thing once: the header (ranks, exception
line), then the rank's `RemoteError.short` lines (the user's line that raised, torch's
error that fsdp_nb re-worded, the explanation), then one pointer to `%fsdp_tb` for
the whole traceback. Which errors get it is decided on the rank, which holds the
exception ([Note: short errors] in fsdp_nb/rank/errors.py).

[Note: wrapping error text]
A browser breaks error output anywhere, mid-word ("use_orig_params=Tru / e"), so the
text is wrapped here, at spaces, before it is sent: WIDTH characters fit a 950 px
output area in JupyterLab's error font. Continuation lines are indented deeper than
any first line, so they read as one item; a word longer than a line (a path,
`use_orig_params=True`) stays whole. Traceback frames are left as Python writes them:
their carets point at columns of the line above.
"""

from __future__ import annotations

import textwrap

from fsdp_nb.session import protocol as P

WIDTH = 100
ITEM = "  "  # the lines under a header
MORE = "    "  # continuation lines, of a header or of an item
POINTER = "%fsdp_tb shows the full traceback."


def wrap(text: str, first: str = "", rest: str = MORE) -> list[str]:
    """`text` as lines of at most WIDTH characters, broken only at spaces (a longer word gets a line of its own)."""
    lines = textwrap.wrap(
        text,
        WIDTH,
        initial_indent=first,
        subsequent_indent=rest,
        break_long_words=False,
        break_on_hyphens=False,  # `odd-dtype`, `--ranks` stay whole
    )
    return lines or [first.rstrip()]


def error_lines(label: str, err: P.RemoteError, *, full: bool) -> list[str]:
    """One error under its `label` ("[ranks 0,1]"): short if the rank recognised it and not `full`."""
    lines = wrap(f"{label} {err.headline()}")
    if err.short and not full:
        for item in err.short:
            lines.extend(wrap(item, ITEM))
    elif err.traceback:
        for line in err.traceback.rstrip("\n").splitlines():
            # Column 0 is prose (the exception's message, "The above exception was ..."): wrapped.
            # Indented lines are frames and code, kept as they are.
            prose = line and not line[0].isspace()
            lines.extend(wrap(line, ITEM) if prose else [ITEM + line])
    return lines
