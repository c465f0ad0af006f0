"""Kernel side of the event channel: a progress bar and a live metrics plot.

Ranks call `fsdp_nb.events.emit("progress", step=, total=, desc=)` and
`emit("metrics", step=, loss=, ...)`. In a Jupyter kernel these drive an ipywidgets
progress bar and a PNG of the metric curves, redrawn at most every REDRAW_S;
elsewhere (terminal IPython, scripts) a one-line text bar on stderr.
Curves persist across cells, keyed by (run, rank), so runs can be overlaid.
"""

from __future__ import annotations

import io
import sys
import time
from collections import defaultdict

REDRAW_S = 0.5


def _in_kernel() -> bool:
    ipython = sys.modules.get("IPython")  # never imported: not a kernel, and no need to pay for it
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class Dashboard:
    """A session's event handler (`session.dashboard`): progress bar and live metric curves."""

    def __init__(self, widgets: bool | None = None):
        self.widgets = _in_kernel() if widgets is None else widgets
        self.series: dict[tuple[str, int], dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self.cell = 0
        self.bar = self.label = self.image = None
        self._shown = False
        self._last_draw = 0.0
        self._dirty = False
        self._saving = None  # this cell's checkpoint status line (a widget in a notebook)
        self._lines: dict[str, object] = {}  # checkpoint path -> the line that shows it, for late news

    def new_cell(self) -> None:
        self.cell += 1
        self.bar = self.label = self.image = None
        self._shown = False
        self._saving = None

    def __call__(self, rank: int, kind: str, payload: dict) -> None:
        if kind == "progress" and rank == 0:  # ranks step together; rank 0 speaks for all
            self._progress(int(payload.get("step", 0)), int(payload.get("total", 0)), str(payload.get("desc", "")))
        elif kind == "metrics":
            run = str(payload.get("run") or f"cell {self.cell}")
            curve = self.series[(run, rank)]
            step = payload.get("step")
            if isinstance(step, (int, float)) and curve.get("step") and step <= curve["step"][-1]:
                curve.clear()  # the run started again (a cell re-run): a fresh curve, not a jump back
            for key, value in payload.items():
                if key != "run" and isinstance(value, (int, float)):
                    curve[key].append(float(value))
            self._dirty = True
            if time.monotonic() - self._last_draw >= REDRAW_S:
                self._draw()
        elif kind == "checkpoint" and rank == 0:  # save_checkpoint's status: rank 0 speaks for all
            self._checkpoint(payload)

    # ---- checkpoints ----------------------------------------------------------------
    def _checkpoint(self, payload: dict) -> None:
        """One status line per cell: the latest checkpoint, updated when a background write ends."""
        path, status = str(payload.get("path", "")), str(payload.get("status", ""))
        name = path.rstrip("/").rsplit("/", 1)[-1]
        seconds = float(payload.get("seconds") or 0.0)
        text = {
            "writing": f"checkpoint {name}: writing in the background ...",
            "saved": f"checkpoint {name}: saved in {seconds:.2f} s"
            + (" (background)" if payload.get("background") else ""),
            "failed": f"checkpoint {name}: FAILED after {seconds:.2f} s (wait() on the handle says why)",
        }.get(status, f"checkpoint {name}: {status}")
        if not self.widgets:
            sys.stderr.write(text + "\n")
            return
        line = self._lines.get(path) if status != "writing" else None  # late news updates its own line
        if line is None:
            if self._saving is None:
                import ipywidgets as w
                from IPython.display import display

                self._saving = w.Label("")
                display(self._saving)
            line = self._saving
        line.value = text
        self._lines[path] = line

    def finish(self) -> None:
        if self._dirty:
            self._draw()
        if not self.widgets and self.bar is not None:
            sys.stderr.write("\n")
            self.bar = None

    # ---- progress -------------------------------------------------------------------
    def _progress(self, step: int, total: int, desc: str) -> None:
        if not self.widgets:
            width = 30
            done = int(width * step / total) if total else 0
            sys.stderr.write(f"\r{desc} [{'#' * done}{'.' * (width - done)}] {step}/{total}")
            sys.stderr.flush()
            self.bar = True
            return
        self._ensure_widgets()
        self.bar.max = max(total, 1)
        self.bar.value = min(step, self.bar.max)
        self.label.value = f"{desc} {step}/{total}"

    def _ensure_widgets(self) -> None:
        if self._shown:
            return
        import ipywidgets as w
        from IPython.display import display

        self.bar = w.IntProgress(value=0, min=0, max=1, layout=w.Layout(width="60%"))
        self.label = w.Label("")
        self.image = w.Image(format="png", layout=w.Layout(max_width="640px"))
        display(w.VBox([w.HBox([self.bar, self.label]), self.image]))
        self._shown = True

    # ---- live plot ------------------------------------------------------------------
    def figure(self, metric: str = "loss"):
        """The curves of `metric` for every (run, rank) seen so far, as a matplotlib Figure."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 3))
        ax = fig.add_subplot()
        current = f"cell {self.cell}"
        for (run, rank), curve in sorted(self.series.items()):
            if metric not in curve:
                continue
            steps = curve.get("step") or list(range(len(curve[metric])))
            ax.plot(
                steps[: len(curve[metric])],
                curve[metric],
                label=f"{run} rank {rank}",
                alpha=1.0 if run == current or not run.startswith("cell ") else 0.5,
            )
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        if ax.lines:
            ax.legend(fontsize="small")
        fig.tight_layout()
        return fig

    def _draw(self) -> None:
        self._last_draw = time.monotonic()
        self._dirty = False
        if not self.widgets:
            return  # terminals get the text bar only; figure() is there on demand
        self._ensure_widgets()
        buf = io.BytesIO()
        self.figure().savefig(buf, format="png")
        self.image.value = buf.getvalue()
