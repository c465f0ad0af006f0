"""Warm starts: ranks forked from the fork server, never reused, and nothing left when the kernel goes.

See [Note: fork safety] in fsdp_nb/session/forkserver.py for what these tests hold the design to.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fsdp_nb import Session
from fsdp_nb.session import forkserver, launcher
from fsdp_nb.session.protocol import FORKSERVER_MARK

pytestmark = pytest.mark.timeout(60)

PPID = "__import__('os').getppid()"


def _alive(pid: int) -> bool:
    """True if `pid` runs and is not a zombie (reparented zombies may linger in containers)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wait_gone(pids, seconds=5.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while [p for p in pids if _alive(p)] and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _descendants(root: int) -> set[int]:
    """Every live process under `root` in the process tree, from /proc."""
    parent = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parent[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return {p for p in found if _alive(p)}


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_restart_forks_fresh_ranks_from_the_warm_server(session):
    old, server = session.pids, session.eval(PPID)[0]
    assert server != os.getpid() and server in _descendants(os.getpid())
    assert _threads(server) == 1, "the fork server must have one thread to fork safely"
    with open(f"/proc/{server}/cmdline") as f:
        assert "fsdp_nb.rank.preload" in f.read()
    t0 = time.perf_counter()
    session.restart()
    took = time.perf_counter() - t0
    assert set(session.pids).isdisjoint(old) and _wait_gone(old) == []
    assert session.eval(PPID) == [server, server]  # fresh processes, forked from the same server
    assert took < 2.0, f"a warm restart took {took:.2f} s"
    seeds = session.eval("torch.initial_seed()")
    assert len(set(seeds)) == 2, "each forked rank needs its own CPU random seed"


def test_thread_count_and_the_kernel_environment_reach_the_ranks(monkeypatch):
    monkeypatch.setenv("FSDP_NB_TEST_LAUNCH_VAR", "set after the server started")
    with Session(2, threads=2) as s:
        assert s.eval(PPID)[0] != os.getpid(), "forked from the server, not spawned"
        s.run(
            "import os\n"
            "before = len(os.listdir('/proc/self/task'))\n"
            "torch.ones(1 << 22).mul_(2)  # a parallel op: OpenMP starts its pool now\n"
            "pool = len(os.listdir('/proc/self/task')) - before"
        ).raise_errors()
        # 2 threads: one OpenMP worker beside the rank's own thread, though the server loaded OpenMP with 1
        assert s.eval("(torch.get_num_threads(), os.environ['OMP_NUM_THREADS'], pool)") == [(2, "2", 1)] * 2
        env = f"[os.environ.get(k) for k in ('FSDP_NB_TEST_LAUNCH_VAR', '{FORKSERVER_MARK}', 'LOCAL_WORLD_SIZE')]"
        assert s.eval(env) == [["set after the server started", None, "2"]] * 2


def test_relaunch_with_another_n_forks_new_ranks(bare_shell, capsys):
    from fsdp_nb import current_session

    bare_shell.run_line_magic("fsdp_launch", "-n 3")
    s3 = current_session()
    pids3 = s3.pids
    assert s3.eval("world_size") == [3, 3, 3]
    bare_shell.run_line_magic("fsdp_shutdown", "")
    bare_shell.run_line_magic("fsdp_launch", "-n 2")
    s2 = current_session()
    try:
        assert s2.eval("(world_size, dist.get_world_size())") == [(2, 2)] * 2
        assert set(s2.pids).isdisjoint(pids3) and _wait_gone(pids3) == []
        before = s2.pids
        bare_shell.run_line_magic("fsdp_restart", "")
        assert set(s2.pids).isdisjoint(before) and len(s2.pids) == 2
    finally:
        s2.close()
    assert "3 ranks ready" in capsys.readouterr().out


def test_a_failed_server_falls_back_to_spawn_with_one_line(monkeypatch, capsys):
    real = launcher._start_process

    def server_gone(proc, ctx):
        if ctx.get_start_method() == "forkserver":
            raise forkserver.ServerFailed("EOFError: unexpected EOF")
        real(proc, ctx)

    monkeypatch.setattr(launcher, "_start_process", server_gone)
    monkeypatch.setattr(forkserver, "_off", None)  # restored afterwards: later tests fork again
    with Session(1) as s:
        assert s.eval(PPID) == [os.getpid()], "spawned by the kernel"
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "fsdp_nb: the fork server stopped (EOFError: unexpected EOF; its reason is on the kernel's stderr); "
        "starting ranks with spawn instead (slower)"
    ]


@pytest.mark.parametrize(
    "platform, switch, note",
    [
        ("darwin", "1", "fsdp_nb: the fork server is only used on Linux (this is darwin); starting ranks with spawn"),
        ("linux", "0", None),  # the user's own choice: nothing to say
    ],
)
def test_spawn_is_chosen_off_linux_or_when_switched_off(monkeypatch, capsys, platform, switch, note):
    monkeypatch.setattr(forkserver, "_off", None)
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setenv(forkserver.SWITCH, switch)
    assert forkserver.context().get_start_method() == "spawn"
    out = capsys.readouterr().out
    assert (out.startswith(note) and out.count("\n") == 1) if note else out == ""


def _preload(extra_env: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.endswith("NUM_THREADS")}
    env.update({FORKSERVER_MARK: "1", **extra_env})
    code = "import fsdp_nb.rank.preload as p, torch; print(p.problems(), torch.cuda.is_initialized())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_the_server_preload_is_fork_safe_and_refuses_when_it_is_not():
    ok = _preload({k: v for k, v in forkserver.SERVER_ENVIRONMENT.items()})
    assert ok.returncode == 0 and ok.stdout == "[] False\n", ok.stderr
    # numpy's OpenBLAS starts threads as it loads when allowed to: the check must catch it
    bad = _preload({"OPENBLAS_NUM_THREADS": "2"})
    assert bad.returncode == 3 and "cannot fork safely (2 threads after importing torch)" in bad.stderr


KERNEL = textwrap.dedent(
    """
    import sys, time
    from IPython.core.interactiveshell import InteractiveShell
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "fsdp_nb")
    shell.run_line_magic("fsdp_launch", "-n 2")
    import fsdp_nb
    s = fsdp_nb.current_session()
    assert s.eval("world_size") == [2, 2]
    print("READY", flush=True)
    if sys.argv[1] == "kill":
        s.run("import time\\ntime.sleep(60)")  # busy ranks: the watchdog, not the idle loop, must see it
    """
)


@pytest.mark.parametrize("how", ["sigkill", "exit"])
def test_no_server_or_rank_outlives_the_kernel(how):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kernel = subprocess.Popen(
        [sys.executable, "-c", KERNEL, "kill" if how == "sigkill" else "exit"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        lines = [kernel.stdout.readline()]
        while lines[-1] not in ("READY\n", ""):
            lines.append(kernel.stdout.readline())
        assert lines[-1] == "READY\n", "".join(lines)
        tree = _descendants(kernel.pid)
        names = {open(f"/proc/{p}/cmdline").read() for p in tree if _alive(p)}
        assert any("fsdp_nb.rank.preload" in n for n in names), names  # the server is under the kernel
        assert len(tree) >= 3, tree  # server and 2 ranks (and multiprocessing's resource tracker)
        if how == "sigkill":
            time.sleep(0.3)  # the ranks are inside the cell
            kernel.send_signal(signal.SIGKILL)
        assert kernel.wait(30) == (-signal.SIGKILL if how == "sigkill" else 0)
        assert _wait_gone(tree) == [], f"left behind after {how}: {_wait_gone(tree, 0)}"
    finally:
        kernel.kill()
        kernel.wait()
