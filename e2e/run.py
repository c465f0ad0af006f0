"""`make e2e`: the tutorials in JupyterLab, in a real browser, as a new user sees them.

    .venv/bin/python e2e/run.py [--only 01]

For each tutorial, on a copy of `notebooks/` with every output, execution count and
saved widget state cleared (a run that never starts cannot pass on committed
outputs), served by a JupyterLab started here (a free loopback port, a token), in
Debian's Chromium driven by Playwright, at a 1400x1000 window with the file browser
open:
- run all cells and wait for the kernel to be idle; every code cell must then carry
  a fresh execution count, in order;
- fail on a visible error other than the ones a cell is tagged to raise, on
  "Loading widget..." or "Error displaying widget", and on any output wider than
  the output area (its scrollWidth against its clientWidth);
- while a training cell runs, read the live progress bar and the plot's step from
  the page (what is visible) and require them to agree; when it ends, require the
  line it leaves to say the run reached its last step;
- in tutorial 01, move the explorer's world-size slider and check the drawing changed;
- save, shut the kernel down, reopen the notebook, and check again: the saved file's
  widget state (tests/notebook_rules.py) and what the page shows;
- save screenshots, top to bottom, of the run and of the reopened notebook, under build/e2e/.
Each kernel is shut down before the next notebook opens; everything started here is
stopped by PID at the end, pass or fail.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
OUT = ROOT / "build" / "e2e"
WINDOW = {"width": 1400, "height": 1000}
CELL_TIMEOUT_S = 240
sys.path.insert(0, str(ROOT / "tests"))
from notebook_rules import widget_models, widget_state_problems  # noqa: E402 - the rules the unit tests apply too


def need(condition: bool, how: str) -> None:
    if not condition:
        sys.exit(f"make e2e: {how}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cleared(path: Path) -> None:
    """The notebook with no output, no execution count and no saved widget state: what a fresh run starts from."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    nb.get("metadata", {}).pop("widgets", None)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


class Lab:
    """A JupyterLab server on a cleared copy of the notebooks; stopped by PID (its process group) on exit."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="fsdp_nb-e2e-"))
        shutil.copytree(ROOT / "notebooks", self.dir / "notebooks")
        shutil.copytree(ROOT / "examples", self.dir / "examples")  # tutorials read ../examples
        for path in (self.dir / "notebooks").glob("*.ipynb"):
            cleared(path)
        self.port, self.token = free_port(), secrets.token_hex(16)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "JUPYTER_CONFIG_DIR": str(self.dir / "cfg")}
        env.pop("FSDP_NB_COLLATE", None)  # live output, as a user gets it
        cmd = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={self.port}",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.dir / 'notebooks'}",
            "--ServerApp.disable_check_xsrf=True",
            "--LabApp.extension_manager=readonly",  # no registry lookups from a machine without internet
        ]
        if os.geteuid() == 0:
            cmd.append("--allow-root")  # a container or CI runs as root
        self.log = open(OUT / "lab.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                self.api("GET", "/api/status")
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        sys.exit(f"make e2e: JupyterLab did not start; see {OUT.relative_to(ROOT) / 'lab.log'}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, method: str, path: str):
        request = urllib.request.Request(f"{self.url}{path}", method=method)
        request.add_header("Authorization", f"token {self.token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def shut_kernels_down(self) -> None:
        """Every kernel of the server, shut down (its ranks follow it); waits until none is listed."""
        for kernel in self.api("GET", "/api/kernels"):
            self.api("DELETE", f"/api/kernels/{kernel['id']}")
        deadline = time.monotonic() + 20
        while self.api("GET", "/api/kernels") and time.monotonic() < deadline:
            time.sleep(0.5)

    def stop(self) -> list[int]:
        """Stop the server (it shuts its kernels down, whose ranks follow), then anything left working
        in the copy, by PID; returns the PIDs that had to be killed that way."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        time.sleep(2)  # ranks exit within a second of their kernel
        stragglers = self.processes()
        for pid in stragglers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        return stragglers

    def processes(self) -> list[int]:
        """PIDs of processes working in the copy of the notebooks: kernels and their ranks."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.readlink(entry / "cwd").startswith(str(self.dir)):
                        found.append(int(entry.name))
                except OSError:
                    continue
        return found


PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook in front
CHECK_OUTPUTS = """() => {
  const PANEL = '.jp-NotebookPanel:not(.lm-mod-hidden)';
  const problems = [];
  for (const cell of document.querySelectorAll(PANEL + ' .jp-CodeCell')) {
    const index = [...document.querySelectorAll(PANEL + ' .jp-Cell')].indexOf(cell);
    const raises = cell.dataset.raises === 'yes';
    for (const out of cell.querySelectorAll('.jp-OutputArea-output')) {
      const text = out.innerText || '';
      if (text.includes('Loading widget') || text.includes('Error displaying widget'))
        problems.push(`cell ${index}: ${text.slice(0, 80)}`);
      if (!raises && (out.dataset.mimeType === 'application/vnd.jupyter.stderr' && /Error|Traceback/.test(text)))
        problems.push(`cell ${index}: an error: ${text.slice(0, 120)}`);
      if (out.scrollWidth > out.clientWidth + 2)
        problems.push(`cell ${index}: output ${out.scrollWidth}px wide in a ${out.clientWidth}px area`);
    }
  }
  return problems;
}"""
# What a live dashboard shows now: its bar's value and maximum, and the step its plot is drawn to.
READ_DASHBOARDS = """() => [...document.querySelectorAll('.fsdp-nb-dashboard')].map(d => {
  const bar = d.querySelector('progress'), plot = d.querySelector('img.fsdp-nb-plot');
  const step = plot ? /step (\\d+)/.exec(plot.alt) : null;
  return {bar: bar ? [bar.value, bar.max] : null, plot: step ? Number(step[1]) : null};
})"""
VISIBLE_CELLS = """() => [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell')]
  .some(c => { const r = c.getBoundingClientRect(); return r.bottom > 100 && r.top < window.innerHeight; })"""


def open_notebook(page, lab: Lab, name: str, tags: dict, dirty_ok: bool = False) -> list[str]:
    page.goto(f"{lab.url}/lab/tree/{name}?reset&token={lab.token}")  # reset: only this notebook open
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    page.wait_for_function("() => document.querySelector('.jp-Notebook-ExecutionIndicator, .jp-Toolbar') !== null")
    time.sleep(2)
    for button in page.locator(".jp-toast-button", has_text="No").all():  # the news question, in the way
        button.click()
    mark_raising(page, tags)
    if page.locator(".lm-TabBar-tab.jp-mod-dirty").count() and not dirty_ok:
        return [f"{name}: shows as modified as soon as it opens"]
    return []


def mark_raising(page, tags: dict) -> None:
    """Mark the cells tagged raises-exception, so their (intended) errors are not counted."""
    page.evaluate(
        """(raising) => {
      const cells = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell')];
      raising.forEach(i => { if (cells[i]) cells[i].dataset.raises = 'yes'; });
    }""",
        tags["raises"],
    )


def command(page, name: str) -> None:
    """Run a JupyterLab command by its label, through the command palette."""
    page.keyboard.press("Escape")
    page.locator(f"{PANEL} .jp-Notebook").click()
    page.keyboard.press("Control+Shift+c")
    page.fill(".lm-CommandPalette-input", name)
    page.keyboard.press("Enter")


def run_all(page, name: str) -> tuple[list[str], list[dict]]:
    """Run All, then wait for the kernel; returns problems and the dashboards read while cells ran."""
    command(page, "Run All Cells")
    start, samples = time.monotonic(), []
    time.sleep(2)
    while time.monotonic() - start < CELL_TIMEOUT_S * 3:
        samples += page.evaluate(READ_DASHBOARDS)
        busy = page.evaluate(
            # textContent: a cell outside the viewport is not rendered, and its innerText is empty
            "() => [...document.querySelectorAll('.jp-InputArea-prompt')].some(p => p.textContent.includes('*'))"
        )
        if not busy:
            break
        time.sleep(0.25)
    else:
        return [f"{name}: still running after {CELL_TIMEOUT_S * 3} s"], samples
    time.sleep(2)  # widgets render after the last message
    return [], samples


def execution_problems(name: str, saved: dict) -> list[str]:
    """Every code cell of the saved file ran in this run, once, in order (the file started with none)."""
    counts = [c["execution_count"] for c in saved["cells"] if c["cell_type"] == "code"]
    if None in counts or counts != sorted(counts) or len(set(counts)) != len(counts):
        return [f"{name} (saved): not every code cell ran once, in order (execution counts {counts})"]
    return []


def check_live_progress(name: str, samples: list[dict]) -> list[str]:
    """While a training cell ran, its bar and its plot showed the same step (what a reader saw)."""
    seen = [s for s in samples if s["bar"] and s["plot"] is not None]
    problems = [
        f"{name}: the bar showed {s['bar'][0]}/{s['bar'][1]} while the plot showed step {s['plot']}"
        for s in seen
        if s["bar"][0] != s["plot"]
    ]
    if name.startswith("02") and not any(0 < s["bar"][0] < s["bar"][1] for s in seen):
        problems.append(f"{name}: no live progress was seen while the training cells ran")
    return problems


def check_final_lines(page, name: str) -> list[str]:
    """Each finished run leaves a visible line; it must say the run reached its last step."""
    problems = []
    texts = "() => [...document.querySelectorAll('.jp-OutputArea-output')].map(o => o.textContent)"
    for text in page.evaluate(texts):
        for line in text.splitlines():
            head = line.split(" · ")[0]
            if head.count("/") == 1 and head.endswith(" steps") and ": " in head:
                done, total = head.rsplit(": ", 1)[1].removesuffix(" steps").split("/")
                if done != total:
                    problems.append(f"{name}: a run ended at step {done} of {total}: {line!r}")
    return problems


def check_explorer(page, name: str) -> list[str]:
    """Tutorial 01: the explorer's world-size slider redraws the figure."""
    svg = page.locator(".widget-html-content svg").first
    if svg.count() == 0:
        return [f"{name}: no explorer drawing found"]
    svg.scroll_into_view_if_needed()
    before = svg.inner_html()
    slider = page.locator(".widget-slider", has_text="world size").locator(".noUi-handle, .ui-slider-handle").first
    slider.focus()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    time.sleep(2)
    after = page.locator(".widget-html-content svg").first.inner_html()
    page.screenshot(path=str(OUT / f"{Path(name).stem}-explorer.png"))
    return [] if after != before else [f"{name}: moving the world-size slider did not change the drawing"]


def screenshots(page, stem: str) -> list[str]:
    """Screenshots from top to bottom; at each position the outputs now on screen are checked too (a cell
    far from the viewport is not rendered, so it can be checked only once it is scrolled to)."""
    scroller = f"document.querySelector('{PANEL} .jp-WindowedPanel-outer')"
    page.evaluate(f"() => ({scroller}).scrollTo(0, 0)")
    time.sleep(1)
    page.screenshot(path=str(OUT / f"{stem}-top.png"))
    problems = page.evaluate(CHECK_OUTPUTS)
    # The rest, a screen at a time, to the bottom: a windowed notebook learns its height as it renders.
    k, top = 0, 0
    while True:
        page.evaluate(f"() => ({scroller}).scrollBy(0, 900)")
        time.sleep(0.5)
        now = page.evaluate(f"() => ({scroller}).scrollTop")
        if now <= top or not page.evaluate(VISIBLE_CELLS):  # the end, or the windowing's empty tail
            break
        k, top = k + 1, now
        page.screenshot(path=str(OUT / f"{stem}-{k:02d}.png"))
        problems += page.evaluate(CHECK_OUTPUTS)
    return list(dict.fromkeys(problems))


def save_and_reopen(page, lab: Lab, name: str, tags: dict) -> list[str]:
    """Save, shut the kernel down, open the saved file again: what a reader finds the next day."""
    command(page, "Save Notebook")
    deadline = time.monotonic() + 20
    while page.locator(".lm-TabBar-tab.jp-mod-current.jp-mod-dirty").count() and time.monotonic() < deadline:
        time.sleep(0.5)
    saved = json.loads((lab.dir / "notebooks" / name).read_text(encoding="utf-8"))
    problems = [f"{name} (saved): {p}" for p in widget_state_problems(saved)]
    problems += execution_problems(name, saved)
    lab.shut_kernels_down()
    # JupyterLab 4 marks any notebook with saved widget state as modified when it restores the widgets
    # (a plain IntSlider does it too): expected there, a defect anywhere else.
    restored = bool(widget_models(saved))
    problems += [f"{p} (reopened)" for p in open_notebook(page, lab, name, tags, dirty_ok=restored)]
    time.sleep(4)  # saved widgets are restored from the file's state
    mark_raising(page, tags)
    problems += [f"{name} (reopened): {p}" for p in screenshots(page, f"{Path(name).stem}-reopened")]
    lab.shut_kernels_down()  # the reopen started a fresh kernel: it goes before the next notebook
    return problems


def tags_of(path: Path) -> dict:
    nb = json.loads(path.read_text())
    raises = [i for i, c in enumerate(nb["cells"]) if "raises-exception" in c.get("metadata", {}).get("tags", [])]
    return {"raises": raises}


def run_notebook(page, lab: Lab, name: str, tags: dict) -> list[str]:
    problems = open_notebook(page, lab, name, tags)
    found, samples = run_all(page, name)
    problems += found
    mark_raising(page, tags)
    problems += check_live_progress(name, samples)
    live = [x for x in samples if x["bar"] and x["plot"] is not None and x["bar"][0] < x["bar"][1]]
    if live:
        steps = sorted({x["plot"] for x in live})
        print(f"  {name}: {len(live)} readings of a live bar and plot mid-run, at steps {steps}")
    if name.startswith("01"):
        problems += check_explorer(page, name)
    problems += [f"{name}: {p}" for p in screenshots(page, Path(name).stem)]
    problems += check_final_lines(page, name)
    return problems + save_and_reopen(page, lab, name, tags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run only tutorials whose name contains this")
    args = parser.parse_args()
    need(Path(CHROMIUM).exists(), f"{CHROMIUM} not found: install it with `apt-get install chromium`")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need(False, "Playwright for Python is missing: `.venv/bin/pip install playwright` (never `playwright install`)")
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.png"):
        old.unlink()
    notebooks = sorted(p for p in (ROOT / "notebooks").glob("*.ipynb") if args.only in p.name)
    lab = Lab()
    problems: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                args=[
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                ],
            )
            for path in notebooks:
                page = browser.new_page(viewport=WINDOW)
                t0 = time.monotonic()
                found = run_notebook(page, lab, path.name, tags_of(path))
                problems += found
                print(f"{path.name}: {'ok' if not found else f'{len(found)} problems'} ({time.monotonic() - t0:.0f} s)")
                page.close()
                lab.shut_kernels_down()
            browser.close()
    finally:
        stragglers = lab.stop()
    if stragglers:
        problems.append(f"processes left behind after JupyterLab stopped (killed): {stragglers}")
    for p in problems:
        print(f"  - {p}")
    print(f"screenshots: {OUT.relative_to(ROOT)}/")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
