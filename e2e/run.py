"""`make e2e`: the tutorials in JupyterLab, in a real browser, as a new user sees them.

    .venv/bin/python e2e/run.py [--only 01] [--keep]

For each tutorial, on a copy of `notebooks/` served by a JupyterLab started here (a
free loopback port, a token), in Debian's Chromium driven by Playwright, at a
1400x1000 window with the file browser open:
- run all cells and wait for the kernel to be idle;
- fail on a visible error other than the ones a cell is tagged to raise, on
  "Loading widget..." or "Error displaying widget", and on any output wider than
  the output area (its scrollWidth against its clientWidth);
- in tutorial 01, move the explorer's world-size slider and check the drawing changed;
- where a cell shows a progress bar and a live plot, check both end on the same step;
- save a screenshot of every tutorial, top and bottom, under build/e2e/.
Everything started here is stopped by PID at the end, pass or fail.
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


def need(condition: bool, how: str) -> None:
    if not condition:
        sys.exit(f"make e2e: {how}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A JupyterLab server on a copy of the notebooks; stopped by PID (its process group) on exit."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="fsdp_nb-e2e-"))
        shutil.copytree(ROOT / "notebooks", self.dir / "notebooks")
        shutil.copytree(ROOT / "examples", self.dir / "examples")  # tutorials read ../examples
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
                urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        sys.exit(f"make e2e: JupyterLab did not start; see {OUT.relative_to(ROOT) / 'lab.log'}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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


def run_notebook(page, lab: Lab, name: str, tags: dict) -> list[str]:
    page.goto(f"{lab.url}/lab/tree/{name}?reset&token={lab.token}")  # reset: only this notebook open
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    page.wait_for_function("() => document.querySelector('.jp-Notebook-ExecutionIndicator, .jp-Toolbar') !== null")
    time.sleep(2)
    # mark the cells tagged raises-exception, so their (intended) errors are not counted
    page.evaluate(
        """(raising) => {
      const cells = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell')];
      raising.forEach(i => { if (cells[i]) cells[i].dataset.raises = 'yes'; });
    }""",
        tags["raises"],
    )
    problems = []
    if page.locator(".lm-TabBar-tab.jp-mod-dirty, .lm-TabBar-tab.jp-mod-current.jp-mod-dirty").count():
        problems.append(f"{name}: shows as modified as soon as it opens")
    for button in page.locator(".jp-toast-button", has_text="No").all():  # the news question, in the way
        button.click()
    page.keyboard.press("Escape")
    page.locator(f"{PANEL} .jp-Notebook").click()
    page.keyboard.press("Control+Shift+c")  # the command palette
    page.fill(".lm-CommandPalette-input", "Run All Cells")
    page.keyboard.press("Enter")
    start = time.monotonic()
    time.sleep(3)
    while time.monotonic() - start < CELL_TIMEOUT_S * 3:
        busy = page.evaluate(
            "() => [...document.querySelectorAll('.jp-InputArea-prompt')].some(p => p.innerText.includes('*'))"
        )
        if not busy:
            break
        time.sleep(1)
    else:
        return [f"{name}: still running after {CELL_TIMEOUT_S * 3} s"]
    time.sleep(2)  # widgets render after the last message
    page.evaluate(
        """(raising) => {
      const cells = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell')];
      raising.forEach(i => { if (cells[i]) cells[i].dataset.raises = 'yes'; });
    }""",
        tags["raises"],
    )
    problems += [f"{name}: {p}" for p in page.evaluate(CHECK_OUTPUTS)]
    stem = Path(name).stem
    scroller = f"document.querySelector('{PANEL} .jp-WindowedPanel-outer')"
    page.evaluate(f"() => ({scroller}).scrollTo(0, 0)")
    time.sleep(1)
    page.screenshot(path=str(OUT / f"{stem}-top.png"))
    height = page.evaluate(f"() => ({scroller}).scrollHeight")
    for k, y in enumerate(range(900, height, 900), 1):  # the rest, a screen at a time
        page.evaluate(f"() => ({scroller}).scrollTo(0, {y})")
        time.sleep(0.5)
        page.screenshot(path=str(OUT / f"{stem}-{k:02d}.png"))
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


def check_progress(page, name: str) -> list[str]:
    """A finished progress bar's final step and the live plot's last step agree (read from the static line)."""
    problems = []
    for text in page.evaluate("() => [...document.querySelectorAll('.jp-OutputArea-output')].map(o => o.innerText)"):
        if text.startswith("progress:") and "plot to step" in text:
            bar = text.split("progress:", 1)[1].split()[0]
            plot = text.split("plot to step", 1)[1].split()[0]
            if bar.split("/")[0] != plot.rstrip(",.;"):
                problems.append(f"{name}: the bar ended at {bar} but the plot at step {plot}")
    return problems


def tags_of(path: Path) -> dict:
    nb = json.loads(path.read_text())
    raises = [i for i, c in enumerate(nb["cells"]) if "raises-exception" in c.get("metadata", {}).get("tags", [])]
    return {"raises": raises}


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
                if path.name.startswith("01"):
                    found += check_explorer(page, path.name)
                found += check_progress(page, path.name)
                problems += found
                print(f"{path.name}: {'ok' if not found else f'{len(found)} problems'} ({time.monotonic() - t0:.0f} s)")
                page.close()
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
