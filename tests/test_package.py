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
    code = ("import sys, fsdp_nb.rank.worker; "
            "print(sorted(m for m in ('matplotlib', 'IPython', 'torch', 'ipywidgets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
