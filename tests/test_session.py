"""Session behaviour on the shared real 2-rank gloo session.

A chosen set (namespace, collectives, errors from one rank and from all, push/pull,
interrupts) runs on two sessions, `any_session`: the spawned 2 ranks, and 4 ranks that two
torchrun agents started on loopback and attached (`Session.listen`), so attach mode is held
to the same behaviour. Those tests read the world size from the session.
"""

from __future__ import annotations

import time

import pytest

from fsdp_nb import RankError, Session, SessionError
from fsdp_nb.session.session import State

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def _attached4(tmp_path_factory):
    """Two torchrun agents of 2 ranks each, attached: started the first time a test asks for it."""
    from test_attach import Attached, stop_agents

    a = Attached(tmp_path_factory.mktemp("attach4"))
    try:
        a.start()
        yield a
    finally:
        a.s.close()
        stop_agents(a.agents, a.pids)


@pytest.fixture(params=["spawned-2", "attached-4"])
def any_session(request):
    if request.param == "spawned-2":
        return request.getfixturevalue("session")
    s = request.getfixturevalue("_attached4").s
    assert s.state == State.READY, s.broken_reason
    return s


def test_namespace_has_rank_world_device_torch_dist(any_session):
    vals = any_session.eval(
        "(rank, world_size, str(device), torch.__name__, dist.is_initialized(), dist.get_backend())"
    )
    W = len(any_session.pids)
    assert vals == [(r, W, "cpu", "torch", True, "gloo") for r in range(W)]


def test_namespace_persists_between_cells(any_session):
    any_session.run("acc = rank * 100").raise_errors()
    any_session.run("acc += 1").raise_errors()
    assert any_session.eval("acc") == [100 * r + 1 for r in range(len(any_session.pids))]


def test_one_thread_per_rank(session):
    assert session.eval("(torch.get_num_threads(), __import__('os').environ['OMP_NUM_THREADS'])") == [(1, "1")] * 2


def test_collectives_work(any_session):
    W = len(any_session.pids)
    got = any_session.eval("(lambda t: (dist.all_reduce(t), t.item())[1])(torch.tensor([rank + 1.0]))")
    assert got == [W * (W + 1) / 2] * W


def test_ranks_subset(session, recorder):
    res = session.run("print('only', rank)\nrank", ranks=[1], output=recorder)
    assert res.values == [None, 1]
    assert recorder.text(0) == "" and recorder.text(1) == "only 1\n"


def test_bad_ranks_subset(session):
    with pytest.raises(SessionError, match="between 0 and 1"):
        session.run("1", ranks=[5])


def test_output_streams_live(session, recorder):
    t0 = time.perf_counter()
    session.run("import time\nprint('early', flush=True)\ntime.sleep(1.0)\nprint('late')", output=recorder)
    early = [t for t, r, n, text in recorder.items if "early" in text]
    assert len(early) == 2 and max(early) - t0 < 0.8, "first line should arrive before the cell ends"


def test_collated_output_is_in_rank_order(session, capsys):
    session.run("import time\ntime.sleep(0.3 * (1 - rank))\nprint('line a')\nprint('line b')", collate=True)
    out = capsys.readouterr().out
    assert out == "[rank 0] line a\n[rank 0] line b\n[rank 1] line a\n[rank 1] line b\n"


def test_live_output_is_prefixed(session, capsys):
    session.run("print(f'hi {rank}')", collate=False)
    lines = sorted(capsys.readouterr().out.splitlines())
    assert lines == ["[rank 0] hi 0", "[rank 1] hi 1"]


def test_stderr_is_forwarded(session, recorder):
    session.run("import sys\nprint('warn', rank, file=sys.stderr)", output=recorder)
    assert recorder.text(1, "stderr") == "warn 1\n"


def test_exception_has_remote_traceback_and_next_cell_works(any_session):
    W = len(any_session.pids)
    res = any_session.run("def f():\n    raise ValueError(f'bad {rank}')\nf()")
    assert not res.ok and {r for r, _ in res.errors} == set(range(W))
    err = res.errors[0][1]
    assert err.type == "ValueError" and 'File "<cell' in err.traceback and "in f" in err.traceback
    assert "worker.py" not in err.traceback and "attached.py" not in err.traceback
    assert any_session.state == State.READY
    assert any_session.eval("rank") == list(range(W))


def test_an_error_on_one_rank_names_it_and_the_others_finish(any_session):
    W = len(any_session.pids)
    res = any_session.run(f"if rank == {W - 1}:\n    raise KeyError('last')\nrank")
    assert [r for r, _ in res.errors] == [W - 1] and res.values[: W - 1] == list(range(W - 1))
    assert str(RankError(res)) == f"rank {W - 1} failed: KeyError: 'last'"
    assert any_session.state == State.READY


def test_errors_grouped_first_failing_rank_first(session):
    res = session.run("import time\nif rank == 0: time.sleep(0.3)\nraise KeyError('same')")
    assert [r for r, _ in res.errors] == [1, 0]
    err = RankError(res)
    groups = err.groups()
    assert len(groups) == 1 and groups[0][0] == [1, 0]
    lines = err._render_traceback_()
    assert lines[0] == "[ranks 0,1] KeyError: 'same'"
    assert str(err) == "ranks 0,1 failed: KeyError: 'same'"  # identical errors: deterministic wording


def test_different_errors_shown_separately(session):
    res = session.run(
        "import time\nif rank == 0:\n    time.sleep(0.2)\n    raise TypeError('t')\nraise ValueError('v')"
    )
    lines = RankError(res)._render_traceback_()
    heads = [ln for ln in lines if ln.startswith("[rank")]
    assert heads == ["[rank 1] ValueError: v", "[rank 0] TypeError: t"]
    assert str(RankError(res)) == "rank 1 failed first: ValueError: v"


def test_syntax_error_is_reported(session):
    res = session.run("def (")
    assert {e.type for _, e in res.errors} == {"SyntaxError"} and session.state == State.READY


def test_push_pull_roundtrip(any_session):
    import torch

    W = len(any_session.pids)
    any_session.push(w=torch.arange(4.0), cfg={"a": 1})
    assert any_session.eval("(w * (rank + 1)).tolist()") == [[0, r + 1, 2 * (r + 1), 3 * (r + 1)] for r in range(W)]
    any_session.run("z = {'rank': rank}")
    assert any_session.pull("z") == [{"rank": r} for r in range(W)]


def test_pull_missing_name(session):
    session.run("if rank == 0: only_zero = 1")
    with pytest.raises(SessionError, match=r"rank 1 has no variable 'only_zero'"):
        session.pull("only_zero")


def test_push_unpicklable(session):
    import threading

    with pytest.raises(SessionError, match="cannot send lock"):
        session.push(lock=threading.Lock())
    assert session.state == State.READY


def test_unpicklable_result_falls_back_to_repr(session):
    res = session.run("import threading\nlk = threading.Lock()\nlk")
    assert res.ok and all(v.startswith("<unlocked _thread.lock") for v in res.values)
    assert "not picklable" in res.notes()[0] and "repr" in res.notes()[0]


def test_trailing_semicolon_suppresses_result(session):
    assert session.run("1 + 1;").values == [None, None]


def test_display_and_plt_show_reach_the_kernel(session, recorder):
    session.run(
        "import matplotlib.pyplot as plt\nplt.plot([0, rank])\nplt.show()\ndisplay({'text/plain': f'custom {rank}'})",
        output=recorder,
    )
    shown = [(r, d) for _, r, n, d in recorder.items if n == "display"]
    assert sorted(r for r, d in shown if "image/png" in d) == [0, 1]
    assert sorted(d["text/plain"] for r, d in shown if "image/png" not in d) == ["custom 0", "custom 1"]


def test_events_are_collected_and_handled(session):
    seen = []
    session.event_handlers.append(lambda r, k, p: seen.append((r, k, p)))
    try:
        res = session.run(
            "from fsdp_nb import events\nfor i in range(3):\n"
            "    events.emit('metrics', step=i, loss=1.0 / (i + 1))\nevents.in_session()"
        )
    finally:
        session.event_handlers.pop()
    assert res.values == [True, True]
    assert [p["step"] for r, k, p in seen if r == 0] == [0, 1, 2]
    assert len(res.events) == 6 and all(k == "metrics" for _, k, _ in res.events)


def test_status_lists_ranks(session):
    rows = session.status()
    assert [r["rank"] for r in rows] == [0, 1] and all(r["alive"] for r in rows)
    assert [r["pid"] for r in rows] == session.pids


def test_busy_session_refuses_a_second_request(session):
    import threading

    t = threading.Thread(target=session.run, args=("import time\ntime.sleep(1)",), kwargs={"output": None})
    t.start()
    time.sleep(0.3)
    assert session.state == State.BUSY and session.status()[0]["running"].startswith("import time ...")
    with pytest.raises(SessionError, match="busy"):
        session.eval("1")
    t.join()
    assert session.state == State.READY


def test_interrupt_from_another_thread(any_session):
    import threading

    threading.Timer(0.5, any_session.interrupt).start()
    t0 = time.perf_counter()
    res = any_session.run("import time\ntime.sleep(600)")
    assert time.perf_counter() - t0 < 2.5
    assert {e.type for _, e in res.errors} == {"KeyboardInterrupt"} and len(res.errors) == len(any_session.pids)
    assert any_session.eval("rank") == list(range(len(any_session.pids)))


def test_interrupt_of_the_waiting_thread_is_relayed(session):
    """A SIGINT to the kernel (what Jupyter's interrupt sends) becomes KeyboardInterrupt on the ranks."""
    import os
    import signal
    import threading

    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    t0 = time.perf_counter()
    res = session.run("while True:\n    pass")
    assert time.perf_counter() - t0 < 2.5 and res.interrupted
    assert {e.type for _, e in res.errors} == {"KeyboardInterrupt"}
    assert session.state == State.READY and session.eval("1") == [1, 1]


@pytest.mark.parametrize(
    "code, why",
    [
        (
            "import os, signal\nif rank == 1: os.kill(os.getpid(), signal.SIGKILL)",
            "rank 1 exited with signal 9 (SIGKILL)",
        ),
        ("import os\nif rank == 1: os._exit(3)", "rank 1 exited with code 3"),
        ("import ctypes\nif rank == 1: ctypes.string_at(0)", "rank 1 exited with signal 11 (SIGSEGV)"),
    ],
)
def test_dead_rank_is_reported_fast(session, code, why):
    t0 = time.perf_counter()
    res = session.run(code + "\nimport time\ntime.sleep(0.5)\ndist.barrier()")
    assert time.perf_counter() - t0 < 1.0
    assert RankError(res).summary().startswith(why)
    assert session.state == State.BROKEN and why in session.broken_reason
    with pytest.raises(SessionError, match="restart"):
        session.run("1")


def test_rank_dying_while_idle_is_noticed(session):
    import os
    import signal

    os.kill(session.pids[1], signal.SIGKILL)
    time.sleep(0.2)
    with pytest.raises(SessionError, match=r"rank 1 exited with signal 9 \(SIGKILL\).*%fsdp_restart"):
        session.eval("1")


def test_restart_gives_fresh_ranks(session):
    session.run("leftover = 1")
    old = session.pids
    session.restart()
    assert set(session.pids).isdisjoint(old)
    assert session.run("leftover").errors[0][1].type == "NameError"


def test_hung_collective_returns_within_timeout():
    """Rank 1 raises while rank 0 waits in a barrier: back within pg timeout + 5 s, then restart works."""
    with Session(2, timeout=3) as s:
        t0 = time.perf_counter()
        res = s.run("if rank == 1:\n    raise ValueError('rank one fails')\ndist.barrier()")
        took = time.perf_counter() - t0
        assert took < 3 + 5, took
        err = RankError(res)
        assert err.summary() == "rank 1 failed first: ValueError: rank one fails; rank 0 stuck in a collective"
        assert "%fsdp_restart" in "\n".join(err._render_traceback_())
        assert s.state == State.BROKEN
        s.restart()
        assert s.eval("(lambda t: (dist.all_reduce(t), t.item())[1])(torch.ones(1))") == [2.0, 2.0]
        procs = [rk.proc for rk in s._ranks]
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def test_session_as_context_manager_starts_on_enter_and_leaves_no_process():
    s = Session(1, start=False)
    assert s.state == State.CLOSED
    with s:  # `with Session(1, start=False)` starts the ranks here
        assert s.state == State.READY and s.eval("world_size") == [1]
        procs = [rk.proc for rk in s._ranks]
    assert s.state == State.CLOSED and all(p.exitcode == 0 for p in procs)
    with pytest.raises(SessionError, match="%fsdp_launch"):
        s.eval("1")


def test_a_python_session_can_drive_the_magics(session, bare_shell, capsys):
    """session.activate() binds a Session made in Python, as ipyparallel's view.activate() does."""
    import fsdp_nb

    assert session.activate() is session and fsdp_nb.current_session() is session
    bare_shell.run_cell_magic("fsdp", "--collate", "print(rank * 7)")
    assert capsys.readouterr().out == "[rank 0] 0\n[rank 1] 7\n"
    bare_shell.run_line_magic("fsdp_status", "")
    assert f"pid {session.pids[1]}" in capsys.readouterr().out


def test_clean_exit_after_autograd_work(tmp_path):
    """Ranks that did autograd and collectives exit 0, with no abort noise on stderr."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(
        "from fsdp_nb import Session\n"
        "s = Session(2, timeout=20)\n"
        "s.run('m = torch.nn.Linear(8, 8)\\nfor _ in range(3):\\n    loss = m(torch.randn(4, 8)).sum()\\n"
        "    loss.backward()\\n    [dist.all_reduce(p.grad) for p in m.parameters()]').raise_errors()\n"
        "procs = [rk.proc for rk in s._ranks]\n"
        "s.close()\n"
        "print('exitcodes', [p.exitcode for p in procs])\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "exitcodes [0, 0]" in out.stdout
    for noise in ("terminate called", "Abort", "SIGABRT", "Traceback"):
        assert noise not in out.stderr, out.stderr


def test_collated_mode_reports_errors_in_rank_order(session, capsys):
    res = session.run(
        "import time\nif rank == 0:\n    time.sleep(0.2)\n    raise TypeError('t')\nraise ValueError('v')", collate=True
    )
    assert [r for r, _ in res.errors] == [0, 1]
    assert str(RankError(res)) == "rank 0 failed: TypeError: t; rank 1 failed: ValueError: v"
    res = session.run("raise ValueError(f'bad {rank}')", collate=True)
    assert str(RankError(res)) == "ranks 0,1 failed: ValueError: bad 0"  # merged by type, whatever the arrival


def test_interrupt_while_printing_large_output_keeps_the_pipe_in_step(session):
    """A SIGINT landing mid-send must not cut a message short (that would hang the kernel)."""
    import threading

    from fsdp_nb.session.output import Silent

    for _ in range(3):
        threading.Timer(0.4, session.interrupt).start()
        t0 = time.perf_counter()
        res = session.run("s = 'x' * 2_000_000\nwhile True:\n    print(s)", output=Silent())
        assert time.perf_counter() - t0 < 3.0
        assert {e.type for _, e in res.errors} == {"KeyboardInterrupt"}
        assert session.eval("rank") == [0, 1]


def test_values_the_kernel_cannot_rebuild_come_back_as_repr(session):
    res = session.run("class Foo:\n    def __repr__(self):\n        return f'Foo on {rank}'\nFoo()")
    assert res.ok and res.values == ["Foo on 0", "Foo on 1"]
    assert "class defined in a cell" in res.notes()[0]
    session.run(
        "from torch.distributed.device_mesh import init_device_mesh\n"
        "from torch.distributed.tensor import distribute_tensor, Shard\n"
        "dt = distribute_tensor(torch.ones(4, 2), init_device_mesh('cpu', (2,)), [Shard(0)])"
    ).raise_errors()
    res = session.run("dt")
    assert all(v.startswith("DTensor(") for v in res.values) and "process-group state" in res.notes()[0]
    with pytest.raises(SessionError, match=r"'dt' on rank 0 cannot be sent to the notebook: it holds process-group"):
        session.pull("dt")
    assert session.eval("dt.full_tensor().sum().item()") == [8.0, 8.0]


def test_interrupted_start_leaves_no_ranks_and_a_closed_session():
    import os
    import signal
    import threading

    import torch.distributed  # noqa: F401  (as in a kernel that already imported torch)

    s = Session(2, start=False)
    # Interrupt every second until one lands: CPython swallows a KeyboardInterrupt
    # raised inside a finaliser ("Exception ignored in ..."), so a single SIGINT can be lost.
    # The lock keeps a last SIGINT from landing after the interrupted block has ended.
    stop, lock = threading.Event(), threading.Lock()

    def interrupt():
        while not stop.wait(1.0):
            with lock:
                if not stop.is_set():
                    os.kill(os.getpid(), signal.SIGINT)

    pest = threading.Thread(target=interrupt, daemon=True)
    pest.start()
    with pytest.raises(KeyboardInterrupt):
        try:
            s.start()
            time.sleep(5)  # in case the start finished before the interrupt
        finally:
            with lock:
                stop.set()
    pest.join()
    procs = [rk.proc for rk in (s._group.ranks if s._group else [])]
    if s.state == State.CLOSED:
        assert all(p.exitcode is not None for p in procs)
    s.close()
    s.start()  # the same session starts cleanly afterwards
    assert s.eval("rank") == [0, 1]
    s.close()
