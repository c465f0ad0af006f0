"""The package surface: lazy public names resolve, and the rank entry point imports light."""

from __future__ import annotations

import subprocess
import sys

import fsdp_nb


def test_every_public_name_resolves():
    for name in fsdp_nb.__all__:
        assert getattr(fsdp_nb, name) is not None


def test_worker_import_does_not_pull_heavy_modules():
    """Ranks import fsdp_nb.rank.worker at spawn; matplotlib, IPython and torch.distributed wait until used."""
    code = (
        "import sys, fsdp_nb.rank.worker; "
        "print(sorted(m for m in ('matplotlib', 'IPython', 'torch', 'ipywidgets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# Names that earlier issues spelled: each stays importable from the path users were given.
CONTRACT = {
    "fsdp_nb": [
        "Session",
        "SessionError",
        "FSDPConfig",
        "shard",
        "Trainer",
        "TrainConfig",
        "GPT",
        "GPTConfig",
        "Layer",
        "current_session",
        "emit",
    ],
    "fsdp_nb.layout": ["ParamSpec", "specs_of", "fsdp1_layout", "fsdp2_layout"],
    "fsdp_nb.inspect": ["layout_of", "memory_of"],
    "fsdp_nb.viz": ["plot_fsdp1", "plot_fsdp2", "plot_comparison", "plot_memory", "format_layout", "explore"],
    "fsdp_nb.models": ["Layer", "GPT", "GPTConfig"],
    "fsdp_nb.data": ["ByteBlocks", "ShardedBatches", "stdlib_corpus", "text_corpus", "load_corpus"],
    "fsdp_nb.events": ["emit"],
    "fsdp_nb.convert": ["convert_to_fsdp2", "config_from_accelerate"],
    "fsdp_nb.cli": ["main"],
}


def test_every_contract_name_imports_from_its_path():
    import importlib

    for module, names in CONTRACT.items():
        mod = importlib.import_module(module)
        missing = [n for n in names if not hasattr(mod, n)]
        assert not missing, f"{module} lost {missing}"


def test_lazy_names_are_visible_to_tools():
    """dir() drives completion; TYPE_CHECKING imports drive type checkers."""
    import ast
    from pathlib import Path

    assert set(fsdp_nb.__all__) <= set(dir(fsdp_nb))
    assert {"Session", "current_session", "explore"} <= set(dir(fsdp_nb)) | set(dir(fsdp_nb.viz))
    tree = ast.parse(Path(fsdp_nb.__file__).read_text())
    typed = {
        a.asname or a.name
        for node in ast.walk(tree)
        if isinstance(node, ast.If)
        for imp in node.body
        if isinstance(imp, ast.ImportFrom)
        for a in imp.names
    }
    assert set(fsdp_nb._LAZY) == typed  # every lazy export is also imported for type checkers


def test_session_error_lives_with_the_session():
    from fsdp_nb.session.errors import SessionError

    assert fsdp_nb.SessionError is SessionError and SessionError.__module__.startswith("fsdp_nb.session")


def test_current_session_without_one_says_to_launch(monkeypatch):
    from fsdp_nb.session import session as module

    monkeypatch.setattr(module, "_current", None)
    try:
        fsdp_nb.current_session()
    except fsdp_nb.SessionError as e:
        assert "%fsdp_launch" in str(e) and "\n" not in str(e)
    else:
        raise AssertionError("current_session() returned without a session")
