"""The repository as others meet it: committed notebook outputs, Binder's files, the README's promises."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# An absolute path of the machine that ran a notebook: a reader on GitHub would see it.
MACHINE_PATH = re.compile(r"(?<![\w.~])/(?:home|root|work|tmp|usr|opt|var|Users|private|mnt|srv)/[\w.+-]+")


def _output_texts(nb: dict):
    for i, cell in enumerate(nb["cells"]):
        for out in cell.get("outputs", []):
            pieces = [out.get("text", ""), out.get("evalue", ""), *out.get("traceback", [])]
            for mime, value in out.get("data", {}).items():
                if mime.startswith("text/"):
                    pieces.append(value)
            for piece in pieces:
                yield i, "".join(piece) if isinstance(piece, list) else piece


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_outputs_hold_no_path_of_the_machine_that_ran_them(path):
    nb = json.loads(path.read_text())
    leaks = [(i, m.group(0)) for i, text in _output_texts(nb) for m in MACHINE_PATH.finditer(text)]
    assert not leaks, f"{path.name}: {leaks[:5]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_outputs_hold_no_live_widget_without_a_picture(path):
    """A widget's saved output must carry something a reader without a kernel can see."""
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "application/vnd.jupyter.widget-view+json" in data:
                assert "image/png" in data or "text/html" in data, f"{path.name} cell {i}: a bare widget"


def test_every_tutorial_ends_with_shutdown_and_runs_under_nbval():
    for path in NOTEBOOKS:
        cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        assert "%fsdp_shutdown" in "".join(cells[-1]["source"]), path.name
    makefile = (ROOT / "Makefile").read_text()
    assert "--nbval notebooks" in makefile  # every notebook of the folder, 00 to 04


def test_binder_installs_what_pyproject_asks_with_a_supported_python():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [ln.strip() for ln in (ROOT / "binder" / "requirements.txt").read_text().splitlines()]
    requirements = [ln for ln in requirements if ln and not ln.startswith("#")]
    # the package, with every dependency pyproject lists, and the hf extra tutorial 06 needs
    assert "-e .[hf]" in requirements
    pinned = [ln for ln in requirements if ln.startswith("torch")]
    makefile_torch = re.search(r"^TORCH\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert pinned == [makefile_torch]  # the same CPU build as `make`
    assert any("download.pytorch.org/whl/cpu" in ln for ln in requirements)  # CPU wheels: a small image
    extra = [ln for ln in requirements if ln != "-e .[hf]" and not ln.startswith(("torch", "--"))]
    assert extra == [], f"binder installs packages pyproject does not list: {extra}"
    runtime = (ROOT / "binder" / "runtime.txt").read_text().strip()
    version = tuple(int(x) for x in runtime.removeprefix("python-").split("."))
    low = tuple(int(x) for x in project["requires-python"].removeprefix(">=").split("."))
    assert version >= low, f"{runtime} is below requires-python {project['requires-python']}"
    deps = {re.split(r"[<>=!\[ ]", d)[0].lower() for d in project["dependencies"]}
    assert {"torch", "ipywidgets", "jupyterlab", "matplotlib"} <= deps
    extras = project["optional-dependencies"]
    assert set(extras["hf"]) <= set(extras["test"])  # make test runs the Hugging Face tests, never skips them


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_a_notebook_opens_unmodified(path):
    """JupyterLab rewrites a kernelspec that differs from the kernel's own, and marks the notebook modified."""
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"] == {
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
        "name": "python3",
    }
    assert (nb["nbformat"], nb["nbformat_minor"]) >= (4, 5) and all("id" in c for c in nb["cells"])


def _repo2docker() -> str | None:
    import shutil

    return shutil.which("repo2docker")  # pip install jupyter-repo2docker, anywhere on PATH


@pytest.mark.skipif(_repo2docker() is None, reason="jupyter-repo2docker is not installed (optional)")
def test_repo2docker_builds_python_311_with_cpu_torch(tmp_path):
    """What Binder would build, without building it: repo2docker's Dockerfile for this repository."""
    import subprocess

    done = subprocess.run(
        [_repo2docker(), "--no-build", "--debug", str(ROOT)], capture_output=True, text=True, timeout=300
    )
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-2000:]
    runtime = (ROOT / "binder" / "runtime.txt").read_text().strip().removeprefix("python-")
    assert f"python={runtime}" in text
    assert 'pip install --no-cache-dir -r "binder/requirements.txt"' in text
    requirements = (ROOT / "binder" / "requirements.txt").read_text()
    assert "download.pytorch.org/whl/cpu" in requirements and "torch==" in requirements


def test_the_example_files_read():
    from fsdp_nb import FSDPConfig
    from fsdp_nb.runfile import load_run_file

    run = load_run_file(str(ROOT / "examples" / "run.yaml"))
    assert run["fsdp"].fsdp_version == 2 and run["train"].steps == 20
    for path in (ROOT / "examples").glob("accelerate_*.yaml"):
        FSDPConfig.from_accelerate_yaml(path)


def test_jupyterlab_saves_widget_state_wherever_fsdp_nb_is_installed():
    """The explorer reopens after a save only if JupyterLab saved its widget state: the default ships with
    the wheel (data files), and the editable installs of `make` and Binder copy it where the wheel puts it."""
    import json

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setting = "jupyter-config/fsdp_nb-widget-state.json"
    assert json.loads((ROOT / setting).read_text()) == {
        "@jupyter-widgets/jupyterlab-manager:plugin": {"saveState": True}
    }
    data_files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    assert data_files == {"share/jupyter/lab/settings/overrides.d": [setting]}
    for copier in ("Makefile", "binder/postBuild"):
        text = (ROOT / copier).read_text()
        assert setting in text and "share/jupyter/lab/settings/overrides.d" in text, copier
