"""Kernel side of the event channel: a progress bar, a live metrics plot, checkpoint status lines.

Ranks call `fsdp_nb.events.emit("progress", step=, total=, desc=)` and
`emit("metrics", step=, loss=, ...)`. What the user sees depends on where the session runs:
- a Jupyter kernel, live output: an ipywidgets progress bar and a PNG of the metric
  curves, redrawn at most every REDRAW_S. When the cell ends, that widget is replaced
  in place by a static PNG and one text line, so a saved notebook shows the result
  on GitHub and after a reopen, with no kernel and no "model not found";
- a Jupyter kernel, collated output (`--collate`, FSDP_NB_COLLATE=1: what nbval
  runs): no widget at all, only the static PNG and the text line at the end;
- elsewhere (terminal IPython, scripts): a one-line text bar on stderr.
Curves persist across cells, keyed by (run, rank), so runs can be overlaid.
"""

from __future__ import annotations

import base64
import io
import sys
import time
from collections import defaultdict

REDRAW_S = 0.3
LINESTYLES = ("-", "--", ":", "-.")  # one per run: identical curves stay visible on top of each other


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
        self.live = True  # False for a collated cell: draw once, at the end
        self.series: dict[tuple[str, int], dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self.cell = 0
        self.bar = self.label = self.image = None
        self.progress: tuple[int, int, str] | None = None  # (step, total, desc) of this cell's bar
        self._handle = None  # the display of this cell's widgets, replaced by a static copy at the end
        self._shown = False
        self._last_draw = 0.0
        self._dirty = False
        self._plotted = False  # this cell emitted metrics
        self._last_run: str | None = None  # the run this cell's metrics belong to
        self._saving = self._saving_handle = None  # this cell's checkpoint status line (a widget in a notebook)
        self._lines: dict[str, object] = {}  # checkpoint path -> the line that shows it, for late news

    def new_cell(self, live: bool = True) -> None:
        self.cell += 1
        self.live = live
        self.bar = self.label = self.image = self._handle = self._saving = self._saving_handle = None
        self.progress = None
        self._last_run = None
        self._shown = self._plotted = False

    def __call__(self, rank: int, kind: str, payload: dict) -> None:
        if kind == "progress" and rank == 0:  # ranks step together; rank 0 speaks for all
            self._progress(int(payload.get("step", 0)), int(payload.get("total", 0)), str(payload.get("desc", "")))
        elif kind == "metrics":
            run = str(payload.get("run") or f"cell {self.cell}")
            self._last_run = run
            curve = self.series[(run, rank)]
            step = payload.get("step")
            if isinstance(step, (int, float)) and curve.get("step") and step <= curve["step"][-1]:
                curve.clear()  # the run started again (a cell re-run): a fresh curve, not a jump back
            for key, value in payload.items():
                if key != "run" and isinstance(value, (int, float)):
                    curve[key].append(float(value))
            self._dirty = self._plotted = True
            if self.live and time.monotonic() - self._last_draw >= REDRAW_S:
                self._draw()
        elif kind == "checkpoint" and rank == 0:  # save_checkpoint's status: rank 0 speaks for all
            self._checkpoint(payload)

    def finish(self) -> None:
        """The cell ended: the last drawing, then (in a notebook) a static copy in place of the widgets."""
        if self._saving is not None:  # the status line turns static too; news after this gets a line of its own
            self._saving_handle.update({"text/plain": self._saving.value}, raw=True)
            self._lines = {k: v for k, v in self._lines.items() if v is not self._saving}
            self._saving.close()
            self._saving = None
        if not self.widgets:
            if self.bar is not None:
                sys.stderr.write("\n")
                self.bar = None
            return
        if not (self._plotted or self.progress):
            return
        bundle = self.static_bundle()
        if self._handle is not None:
            self._handle.update(bundle, raw=True)  # the widget's place in the output, now static
            for widget in (self.bar, self.label, self.image):
                widget.close()
        else:
            from IPython.display import display

            display(bundle, raw=True)
        # Done with this cell: a later request (a silent eval) must not show it again.
        self.bar = self.label = self.image = self._handle = None
        self.progress, self._plotted, self._shown, self._dirty = None, False, False, False

    def summary(self) -> str:
        """The text line a finished cell leaves: where the bar and the plot ended."""
        parts = []
        if self.progress:
            step, total, desc = self.progress
            parts.append(f"progress: {step}/{total} {desc}".rstrip())
        if self._plotted:
            current = [c for (run, _), c in self.series.items() if run == self._current_run()]
            last = max((int(c["step"][-1]) for c in current if c.get("step")), default=0)
            parts.append(f"live plot to step {last}")
        return "; ".join(parts)

    def static_bundle(self) -> dict:
        """A MIME bundle of the final state: the curves as PNG (if any) and the summary line."""
        bundle = {"text/plain": self.summary()}
        if self._plotted:
            buf = io.BytesIO()
            self.figure().savefig(buf, format="png", dpi=100)
            bundle["image/png"] = base64.b64encode(buf.getvalue()).decode("ascii")
        return bundle

    def _current_run(self) -> str:
        return self._last_run or f"cell {self.cell}"

    # ---- progress -------------------------------------------------------------------
    def _progress(self, step: int, total: int, desc: str) -> None:
        self.progress = (step, total, desc)
        if not self.widgets:
            width = 30
            done = int(width * step / total) if total else 0
            sys.stderr.write(f"\r{desc} [{'#' * done}{'.' * (width - done)}] {step}/{total}")
            sys.stderr.flush()
            self.bar = True
            return
        if not self.live:
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
        self._handle = display(w.VBox([w.HBox([self.bar, self.label]), self.image]), display_id=True)
        self._shown = True

    # ---- live plot ------------------------------------------------------------------
    def figure(self, metric: str = "loss"):
        """The curves of `metric` for every (run, rank) seen so far, as a matplotlib Figure.

        Each run has its own line style, so two runs with identical losses (FSDP1 and
        FSDP2 on the same data) both stay visible. Steps are whole numbers; with a
        progress total the x axis is fixed from the first point, so it does not jump.
        """
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        fig = Figure(figsize=(6.4, 3), dpi=100)
        ax = fig.add_subplot()
        current = f"cell {self.cell}"
        runs = list(dict.fromkeys(run for run, _ in sorted(self.series)))
        last = 1
        for (run, rank), curve in sorted(self.series.items()):
            if metric not in curve:
                continue
            steps = curve.get("step") or list(range(1, len(curve[metric]) + 1))
            steps = steps[: len(curve[metric])]
            last = max(last, int(max(steps)))
            style = LINESTYLES[runs.index(run) % len(LINESTYLES)]
            ax.plot(
                steps,
                curve[metric],
                style,
                marker="o" if len(steps) < 12 else None,
                markersize=3,
                linewidth=2.2 - 0.4 * (runs.index(run) % 3),
                label=f"{run} rank {rank}",
                alpha=1.0 if run == current or not run.startswith("cell ") else 0.5,
            )
        total = self.progress[1] if self.progress else 0
        ax.set_xlim(0.5, max(total, last) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        if ax.lines:
            ax.legend(fontsize="small")
        fig.tight_layout()
        return fig

    def _draw(self) -> None:
        self._last_draw = time.monotonic()
        self._dirty = False
        if not self.widgets or not self.live:
            return  # terminals get the text bar; collated cells draw once, at the end
        self._ensure_widgets()
        buf = io.BytesIO()
        self.figure().savefig(buf, format="png", dpi=100)
        self.image.value = buf.getvalue()

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
            if self.bar is not None:  # a text progress bar holds the line: start a new one
                sys.stderr.write("\n")
                self.bar = None
            sys.stderr.write(text + "\n")
            return
        if not self.live:  # collated: a plain line, printed at the end with the rest
            print(f"fsdp_nb: {text}")
            return
        line = self._lines.get(path) if status != "writing" else None  # news in the same cell updates its line
        if line is None and status != "writing" and payload.get("background"):
            text += " (started in an earlier cell)"
        if line is None:
            if self._saving is None:
                import ipywidgets as w
                from IPython.display import display

                self._saving = w.Label("")
                self._saving_handle = display(self._saving, display_id=True)
            line = self._saving
        line.value = text
        self._lines[path] = line
