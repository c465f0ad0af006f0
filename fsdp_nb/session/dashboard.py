"""Kernel side of the event channel: a progress bar, a live metrics plot, checkpoint status lines.

Ranks call `fsdp_nb.events.emit("progress", step=, total=, desc=)` and
`emit("metrics", step=, loss=, ...)`. What the user sees depends on where the session runs:
- a Jupyter kernel, live output: one widget holding a progress bar and a PNG of the
  metric curves, both at the same step [Note: one step on screen], redrawn at most
  every REDRAW_S. When the cell ends, that widget is replaced in place by a static
  PNG, and a text line below it says how far the run got, its last loss and its
  time: a saved notebook shows both on GitHub and after a reopen, with no kernel
  and no "model not found";
- a Jupyter kernel, collated output (`--collate`, FSDP_NB_COLLATE=1: what nbval
  runs): no widget at all, only the static PNG and the text line at the end;
- elsewhere (terminal IPython, scripts): a one-line text bar on stderr.
Curves persist across cells, keyed by (run, rank), so runs can be overlaid.
"""

from __future__ import annotations

import base64
import html
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


def _close(widget) -> None:
    """Close a widget and the models it made for itself (its layout and style): a closed widget whose
    layout lives on would be saved with the notebook as a model that no output uses."""
    for part in (widget, getattr(widget, "layout", None), getattr(widget, "style", None)):
        if part is not None:
            part.close()


class Dashboard:
    """A session's event handler (`session.dashboard`): progress bar and live metric curves.

    [Note: one step on screen]
    The bar and the plot must never disagree about where the run is. Live, both sit in
    ONE ipywidgets HTML widget, redrawn together from the same step k: an HTML
    `<progress>` at k/N, and the plot drawn up to k, whose title says "step k/N" (its
    `alt` text says the same, for a reader or a browser test). One widget value is
    one message, so the browser can never show the bar ahead of the plot. k is the
    last step every curve of this cell's run has reached (a progress event arrives
    before that step's metrics, and ranks report one by one).
    """

    def __init__(self, widgets: bool | None = None):
        self.widgets = _in_kernel() if widgets is None else widgets
        self.live = True  # False for a collated cell: draw once, at the end
        self.series: dict[tuple[str, int], dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self.cell = 0
        self.view = None  # the live widget: bar, step line and plot in one HTML value
        self.progress: tuple[int, int, str] | None = None  # (step, total, desc) of this cell's bar
        self.bar = None  # True while a text bar holds the terminal's line (no widgets)
        self._handle = None  # the display of this cell's widget, replaced by a static copy at the end
        self._started: float | None = None  # this cell's first event, for the time in the summary
        self._last_draw = 0.0
        self._plotted = False  # this cell emitted metrics
        self._last_run: str | None = None  # the run this cell's metrics belong to
        self._saving = self._saving_handle = None  # this cell's checkpoint status line (a widget in a notebook)
        self._lines: dict[str, object] = {}  # checkpoint path -> the line that shows it, for late news

    def new_cell(self, live: bool = True) -> None:
        self.cell += 1
        self.live = live
        self.view = self._handle = self._saving = self._saving_handle = None
        self.progress = self._started = self._last_run = None
        self._plotted = False

    def __call__(self, rank: int, kind: str, payload: dict) -> None:
        if kind in ("progress", "metrics") and self._started is None:
            self._started = time.monotonic()
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
            self._plotted = True
            self._maybe_draw(final_step=bool(self.progress) and self.shown_step() >= self.progress[1])
        elif kind == "checkpoint" and rank == 0:  # save_checkpoint's status: rank 0 speaks for all
            self._checkpoint(payload)

    def finish(self) -> None:
        """The cell ended: in a notebook, a static picture in place of the widget, and a line below it."""
        if self._saving is not None:  # the status line turns static too; news after this gets a line of its own
            self._saving_handle.update({"text/plain": self._saving.value}, raw=True)
            self._lines = {k: v for k, v in self._lines.items() if v is not self._saving}
            _close(self._saving)
            self._saving = None
        if not self.widgets:
            if self.bar is not None:
                sys.stderr.write("\n")
                self.bar = None
            return
        if not (self._plotted or self.progress):
            return
        from IPython.display import display

        line = self.summary()
        picture = self.static_bundle(line)
        if self._handle is not None:
            self._handle.update(picture, raw=True)  # the widget's place in the output, now static
            _close(self.view)
        elif "image/png" in picture:
            display(picture, raw=True)
        # The line is an output of its own: beside a PNG, a text/plain part is never shown.
        display({"text/plain": line}, raw=True)
        # Done with this cell: a later request (a silent eval) must not show it again.
        self.view = self._handle = None
        self.progress, self._plotted, self._started = None, False, None

    def shown_step(self) -> int:
        """The step the bar and the plot both show: the last one every curve of this cell's run reached,
        and no further than the progress events have said."""
        reached = [int(c["step"][-1]) for c in self._current_curves() if c.get("step")]
        plotted = min(reached) if reached else None
        said = self.progress[0] if self.progress else None
        return min(s for s in (plotted, said) if s is not None) if (plotted, said) != (None, None) else 0

    def summary(self) -> str:
        """The line a finished cell leaves: how far the run got, its last loss, and how long it took."""
        step, total, desc = self.progress if self.progress else (self.shown_step(), 0, "")
        head = (
            f"{desc or self._current_run()}: {step}/{total} steps" if total else f"{self._current_run()}: {step} steps"
        )
        parts = [head]
        losses = [c["loss"][-1] for c in self._current_curves() if c.get("loss")]
        if losses:
            parts.append(f"final loss {losses[0]:.4f}")
        if self._started is not None:
            parts.append(f"in {time.monotonic() - self._started:.2f} s")
        return " · ".join(parts)

    def static_bundle(self, summary: str | None = None) -> dict:
        """A MIME bundle of the final picture: the curves as PNG (if any), and the summary as text."""
        bundle = {"text/plain": summary if summary is not None else self.summary()}
        if self._plotted:
            bundle["image/png"] = base64.b64encode(self._png()).decode("ascii")
        return bundle

    def _current_run(self) -> str:
        return self._last_run or f"cell {self.cell}"

    def _current_curves(self) -> list[dict]:
        if not self._plotted:
            return []
        return [c for (run, _), c in sorted(self.series.items()) if run == self._current_run()]  # rank 0 first

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
        self._maybe_draw(final_step=step >= total)

    # ---- live view ------------------------------------------------------------------
    def _maybe_draw(self, final_step: bool = False) -> None:
        """Redraw the live widget at most every REDRAW_S (and at the last step)."""
        if not (self.widgets and self.live):
            return  # terminals get the text bar; collated cells draw once, at the end
        if final_step or time.monotonic() - self._last_draw >= REDRAW_S:
            self._draw()

    def _draw(self) -> None:
        self._last_draw = time.monotonic()
        if self.view is None:
            import ipywidgets as w
            from IPython.display import display

            self.view = w.HTML()
            self._handle = display(self.view, display_id=True)
        self.view.value = self.live_html()
        self._last_draw = time.monotonic()  # drawing takes time: the next redraw waits from its end

    def live_html(self) -> str:
        """The live widget's HTML: the bar at the shown step k, its line, and the plot drawn to k."""
        k = self.shown_step()
        total, desc = (self.progress[1], self.progress[2]) if self.progress else (0, "")
        parts = ['<div class="fsdp-nb-dashboard">']
        if total:
            parts.append(
                f'<div><progress class="fsdp-nb-bar" value="{min(k, total)}" max="{max(total, 1)}" '
                f'style="width:60%;vertical-align:middle"></progress> '
                f'<span class="fsdp-nb-step">{html.escape(desc)} {k}/{total}</span></div>'
            )
        if self._plotted:
            png = base64.b64encode(self._png()).decode("ascii")
            title = html.escape(self._title(k))
            parts.append(f'<img class="fsdp-nb-plot" alt="{title}" src="data:image/png;base64,{png}" '
                         'style="max-width:100%"/>')  # fmt: skip
        parts.append("</div>")
        return "".join(parts)

    def _title(self, k: int, metric: str = "loss") -> str:
        total = self.progress[1] if self.progress else 0
        return f"{metric}, step {k}/{total}" if total else f"{metric}, step {k}"

    def _png(self) -> bytes:
        buf = io.BytesIO()
        self.figure(title=self._title(self.shown_step())).savefig(buf, format="png", dpi=100)
        return buf.getvalue()

    # ---- the plot -------------------------------------------------------------------
    def figure(self, metric: str = "loss", *, title: str | None = None):
        """The curves of `metric` for every (run, rank) seen so far, as a matplotlib Figure.

        Each run has its own line style, so two runs with identical losses (FSDP1 and
        FSDP2 on the same data) both stay visible. Steps are whole numbers; with a
        progress total the x axis is fixed from the first point, so it does not jump.
        """
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        fig = Figure(figsize=(6.4, 3.2), dpi=100, layout="constrained")
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
        if title:
            ax.set_title(title, loc="left", fontsize="medium")
        if ax.lines:  # beside the axes, never over a curve
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        return fig

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
