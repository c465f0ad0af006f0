"""%fsdp_export: the session's cells as a torchrun script that really runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fsdp_nb import RankError
from fsdp_nb.session.export import Step, script

OPTS = dict(nprocs=2, device="cpu", backend="gloo", timeout=30.0, threads=1)


def test_script_compiles_and_wraps_rank_subsets():
    text, warnings = script([Step(source="x = rank"), Step(source="print(x)", ranks=(1,))], **OPTS)
    compile(text, "s", "exec")
    assert "if rank in (1,):\n    print(x)" in text and warnings == []


def test_non_literal_push_is_flagged():
    text, warnings = script([Step(pushed={"lr": 0.1, "obj": object()})], **OPTS)
    assert "lr = 0.1" in text and "obj = None" in text
    assert warnings and warnings[0].startswith("obj was pushed")


def test_ipython_syntax_is_flagged():
    _, warnings = script([Step(source="!ls")], **OPTS)
    assert "does not compile" in warnings[0]


@pytest.mark.timeout(120)
def test_exported_session_runs_under_torchrun_with_the_same_result(ipshell, session, tmp_path):
    session.restart()  # export covers this session's history only
    ipshell.user_ns["scale"] = 3.0
    ipshell.run_line_magic("fsdp_push", "scale")
    ipshell.run_cell_magic("fsdp", "", "t = torch.tensor([rank + 1.0]) * scale\ndist.all_reduce(t)")
    ipshell.run_cell_magic("fsdp", "--ranks 0", "print('total', t.item())")
    with pytest.raises(RankError):
        ipshell.run_cell_magic("fsdp", "", "undefined_name")  # failed cells are not exported
    path = tmp_path / "exported.py"
    ipshell.run_line_magic("fsdp_export", str(path))
    in_session = session.eval("t.item()")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", str(path)],
        capture_output=True,
        text=True,
        timeout=100,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("total") == 1 and f"total {in_session[0]}" in out.stdout
    assert "undefined_name" not in path.read_text()
