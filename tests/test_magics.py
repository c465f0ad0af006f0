"""The magics in a real in-process IPython shell, over the shared session."""

from __future__ import annotations

import multiprocessing as mp

import pytest
from IPython.core.error import UsageError

import fsdp_nb
from fsdp_nb import RankError
from fsdp_nb.session.session import State

pytestmark = pytest.mark.timeout(60)


def test_fsdp_cell_runs_on_every_rank_and_shows_values(ipshell, capsys):
    ipshell.run_cell_magic("fsdp", "--collate", "print('hello', rank)\nrank * 2")
    out = capsys.readouterr().out
    assert out == "[rank 0] hello 0\n[rank 1] hello 1\nOut[rank 0]: 0\nOut[rank 1]: 2\n"


def test_output_name_stores_list_by_rank(ipshell):
    ipshell.run_cell_magic("fsdp", "-o vals", "rank + 10")
    assert ipshell.user_ns["vals"] == [10, 11]


def test_ranks_flag(ipshell, capsys):
    ipshell.run_cell_magic("fsdp", "--ranks 1 --collate", "print('r', rank)")
    assert capsys.readouterr().out == "[rank 1] r 1\n"


def test_bad_ranks_flag(ipshell):
    with pytest.raises(UsageError, match="--ranks 'x' is not valid"):
        ipshell.run_cell_magic("fsdp", "--ranks x", "1")
    with pytest.raises(UsageError, match="between 0 and 1"):
        ipshell.run_cell_magic("fsdp", "--ranks 7", "1")


def test_cell_error_raises_rank_error_and_session_survives(ipshell, capsys):
    with pytest.raises(RankError) as info:
        ipshell.run_cell_magic("fsdp", "", "raise RuntimeError(f'oops {rank}')")
    assert "RuntimeError: oops" in str(info.value)
    ipshell.run_cell_magic("fsdp", "--collate", "print('fine')")
    assert "[rank 0] fine" in capsys.readouterr().out


def test_rank_error_renders_remote_traceback_in_the_shell(ipshell, capsys):
    result = ipshell.run_cell("%%fsdp\nraise ValueError('shown')")
    assert isinstance(result.error_in_exec, RankError)
    out = capsys.readouterr()
    text = out.out + out.err
    assert "[ranks 0,1] ValueError: shown" in text and 'File "<cell' in text
    assert "magics.py" not in text  # only the remote traceback, not ours


def test_push_and_pull(ipshell):
    ipshell.user_ns["cfg"] = {"lr": 0.1}
    ipshell.run_line_magic("fsdp_push", "cfg")
    ipshell.run_cell_magic("fsdp", "", "got = cfg['lr'] * (rank + 1)")
    assert ipshell.run_line_magic("fsdp_pull", "got") == [0.1, 0.2]


def test_status_prints_ranks_and_pids(ipshell, capsys, session):
    ipshell.run_line_magic("fsdp_status", "")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "fsdp_nb session: 2 ranks, backend gloo, device cpu, state ready"
    assert out[1:] == [f"  rank {r}: pid {pid}, alive" for r, pid in enumerate(session.pids)]


@pytest.mark.parametrize(
    "line, message",
    [
        ("--bogus", "unrecognized arguments: --bogus"),
        ("-n 0", "nprocs=0 is not valid"),
        ("-n abc", "invalid int value: 'abc'"),
        ("-n 100000", "more ranks than this machine can run"),
        ("--backend nccl", "--backend nccl needs CUDA"),
        ("--device cuda", "--device cuda needs CUDA"),
        ("--device tpu", "invalid choice: 'tpu'"),
        ("--timeout -1", "timeout=-1.0 is not valid"),
    ],
)
def test_bad_launch_flags_are_one_line_usage_errors(bare_shell, line, message):
    before = len(mp.active_children())
    with pytest.raises(UsageError) as info:
        bare_shell.run_line_magic("fsdp_launch", line)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert len(mp.active_children()) == before, "a rejected launch must start nothing"


def test_second_launch_says_use_restart(ipshell):
    with pytest.raises(UsageError, match="already running.*%fsdp_restart"):
        ipshell.run_line_magic("fsdp_launch", "-n 2")


def test_cell_before_launch(bare_shell):
    with pytest.raises(UsageError, match="no session is running; start one with %fsdp_launch"):
        bare_shell.run_cell_magic("fsdp", "", "1")
    with pytest.raises(UsageError, match="%fsdp_launch"):
        bare_shell.run_line_magic("fsdp_pull", "x")


def test_pull_of_a_missing_name(ipshell):
    with pytest.raises(UsageError, match=r"ranks 0,1 have no variable 'nope'; define it in a %%fsdp cell first"):
        ipshell.run_line_magic("fsdp_pull", "nope")


def test_push_of_unpicklable_and_undefined(ipshell):
    ipshell.user_ns["gen"] = (i for i in range(3))
    with pytest.raises(UsageError, match="cannot send gen to the ranks"):
        ipshell.run_line_magic("fsdp_push", "gen")
    with pytest.raises(UsageError, match="undefined_thing not defined in the notebook"):
        ipshell.run_line_magic("fsdp_push", "undefined_thing")


def test_unpicklable_result_shows_repr_and_says_so(ipshell, capsys):
    ipshell.run_cell_magic("fsdp", "--collate", "(x for x in [])")
    out = capsys.readouterr().out
    assert "[rank 0] note: result shown as its repr: it is not picklable (TypeError" in out
    assert "Out[rank 0]: <generator object" in out


def test_broken_session_suggests_restart_then_restart_works(ipshell, session, capsys):
    with pytest.raises(RankError):
        ipshell.run_cell_magic("fsdp", "", "import os\nif rank == 0: os._exit(1)\ndist.barrier()")
    with pytest.raises(UsageError, match=r"broken \(rank 0 exited with code 1\); run %fsdp_restart"):
        ipshell.run_cell_magic("fsdp", "", "1")
    ipshell.run_line_magic("fsdp_restart", "")
    assert "ranks restarted (backend gloo, device cpu, torch" in capsys.readouterr().out
    assert session.state == State.READY and session.eval("rank") == [0, 1]


def test_progress_and_metrics_events_drive_the_dashboard(ipshell, session):
    dash = session.dashboard  # the dashboard belongs to the session
    dash.series.clear()  # the shared session's curves from earlier tests
    dash.widgets = True  # what a Jupyter kernel uses
    at_end = {}
    finish = dash.finish

    def spy():  # the widget as the cell ends, before it is replaced by its static copy
        at_end.update(view=dash.view.value, bundle=dash.static_bundle())
        finish()

    dash.finish = spy
    try:
        ipshell.run_cell_magic(
            "fsdp",
            "",
            "from fsdp_nb import events\nfor i in range(1, 6):\n"
            "    events.emit('progress', step=i, total=5, desc='train')\n"
            "    events.emit('metrics', step=i, loss=10.0 / i, run='demo')",
        )
        assert '<progress class="fsdp-nb-bar" value="5" max="5"' in at_end["view"]
        assert "train 5/5</span>" in at_end["view"] and 'alt="loss, step 5/5"' in at_end["view"]
        assert 'src="data:image/png;base64,iVBORw0KGgo' in at_end["view"]  # a PNG
        assert at_end["bundle"]["text/plain"].startswith("train: 5/5 steps · final loss 2.0000 · in ")
        assert dash.view is None  # closed and forgotten: a later silent request shows nothing again
        fig = dash.figure("loss")
        lines = fig.axes[0].lines
        assert sorted(ln.get_label() for ln in lines) == ["demo rank 0", "demo rank 1"]
        assert list(lines[0].get_ydata()) == [10.0, 5.0, 10.0 / 3, 2.5, 2.0]
    finally:
        dash.widgets = False
        dash.finish = finish


def test_env_variable_makes_collated_the_default(ipshell, capsys, monkeypatch):
    monkeypatch.setenv("FSDP_NB_COLLATE", "1")
    ipshell.run_cell_magic("fsdp", "", "import time\ntime.sleep(0.2 * (1 - rank))\nprint('x', rank)")
    assert capsys.readouterr().out == "[rank 0] x 0\n[rank 1] x 1\n"


def test_dashboard_restarts_a_curve_when_a_run_is_repeated():
    from fsdp_nb.session.dashboard import Dashboard

    dash = Dashboard(widgets=False)
    for _ in range(2):  # the same named run, twice (a re-run cell)
        for step in (1, 2, 3):
            dash(0, "metrics", {"step": step, "loss": 1.0 / step, "run": "a"})
    assert dash.series[("a", 0)]["step"] == [1, 2, 3]


def test_restart_after_shutdown_relaunches_with_the_same_options(bare_shell, capsys):
    bare_shell.run_line_magic("fsdp_launch", "-n 1 --timeout 30")
    session = fsdp_nb.current_session()
    try:
        bare_shell.run_line_magic("fsdp_shutdown", "")
        bare_shell.run_line_magic("fsdp_restart", "")
        assert "1 ranks restarted" in capsys.readouterr().out
        assert fsdp_nb.current_session() is session
        assert session.config.timeout == 30 and session.eval("world_size") == [1]
    finally:
        session.close()
