"""Attach mode: ranks that two torchrun agents start (on loopback) join a listening session.

ONE module-scoped attached session (2 agents x 2 ranks) serves the tests in file order;
the destructive ones come last and restart it (which relaunches the agents). Every
test that starts agents kills their process groups by PID and checks /proc that
nothing is left.
"""

from __future__ import annotations

import ast
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import AuthenticationError, Client

import pytest

from fsdp_nb import Session
from fsdp_nb.session import protocol as P
from fsdp_nb.session.session import State

pytestmark = pytest.mark.timeout(90)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = (
    "from fsdp_nb import FSDPConfig, Trainer, TrainConfig\nfrom fsdp_nb.models import GPT, GPTConfig\n"
    "from fsdp_nb.data import ByteBlocks, stdlib_corpus\n"
    "tr = Trainer(GPT(GPTConfig.debug(), seed=0), ByteBlocks(stdlib_corpus(40_000), 16), "
    "TrainConfig(steps=4, global_batch_size=8, log_interval=0), fsdp=FSDPConfig(fsdp_version=2))\n"
    "losses = [h['loss'] for h in tr.fit()]"
)


def start_agents(endpoint, n: int = 2, env=None) -> list[subprocess.Popen]:
    """The printed torchrun command, run as printed (torchrun found on PATH), once per node."""
    argv = shlex.split(endpoint.commands()[0])
    bindir = os.path.dirname(sys.executable)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "PATH": bindir + os.pathsep + os.environ["PATH"],
           **(env or {})}  # fmt: skip
    return [
        subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(n)
    ]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def stop_agents(agents, pids=()) -> None:
    """Kill each agent's process group by PID, then check that no agent or rank is left."""
    for a in agents:
        try:
            os.killpg(a.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for a in agents:
        a.wait(10)
    deadline = time.monotonic() + 5  # ranks sit in sessions of their own: their watchdog sees the agent go
    pids = [a.pid for a in agents] + list(pids)
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in pids if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"


class Attached:
    def __init__(self, tmp):
        self.s = Session.listen(
            "127.0.0.1:0", nnodes=2, nproc_per_node=2, wait=False, timeout=6, key_file=str(tmp / "key"), join_timeout=60
        )
        self.agents: list = []
        self.pids: list[int] = []

    def start(self, restart: bool = False):
        if restart:  # restart() blocks until the ranks join: start the agents once it listens
            t = threading.Thread(target=self.s.restart)
            t.start()
            while not (self.s.state == State.STARTING and self.s.endpoint._accepting):
                time.sleep(0.05)
            self.agents = start_agents(self.s.endpoint)
            t.join(60)
        else:
            self.agents = start_agents(self.s.endpoint)
            self.s.start()
        assert self.s.state == State.READY
        self.pids = list(self.s.pids)
        return self.s


@pytest.fixture(scope="module")
def attached(tmp_path_factory):
    a = Attached(tmp_path_factory.mktemp("attach"))
    a.start()
    yield a
    a.s.close()
    stop_agents(a.agents, a.pids)


def test_listen_binds_loopback_and_writes_a_private_key(attached):
    e = attached.s.endpoint
    assert e.host == "127.0.0.1" and os.stat(e.key_file).st_mode & 0o777 == 0o600
    torchrun, srun = e.commands()
    assert "--rdzv-endpoint 127.0.0.1:" in torchrun and f"--key-file {e.key_file}" in torchrun
    assert srun.startswith("srun --nodes 2 --ntasks-per-node 1 torchrun --nnodes 2") and "SLURM_JOB_NODELIST" in srun


def test_run_eval_and_status_name_host_and_pid(attached, bare_shell, capsys):
    s = attached.s
    assert s.eval("(rank, world_size, dist.get_backend())") == [(r, 4, "gloo") for r in range(4)]
    assert s.eval("__import__('os').getpid()") == s.pids
    assert s.eval("(lambda t: (dist.all_reduce(t), t.item())[1])(torch.tensor([rank + 1.0]))") == [10.0] * 4
    s.activate()
    bare_shell.run_line_magic("fsdp_status", "")
    out = capsys.readouterr().out
    assert "4 ranks attached" in out and all(f"pid {row['pid']} on {row['host']}, alive" in out for row in s.status())


def test_push_pull_and_an_error_on_one_rank(attached):
    s = attached.s
    s.push(scale=3)
    s.run("y = rank * scale").raise_errors()
    assert s.pull("y") == [0, 3, 6, 9]
    res = s.run("if rank == 2:\n    raise ValueError('only two')")
    assert [r for r, _ in res.errors] == [2] and res.errors[0][1].message == "only two"
    assert s.state == State.READY and s.eval("1") == [1] * 4


def test_interrupt_reaches_attached_ranks(attached):
    s = attached.s
    threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    t0 = time.perf_counter()
    res = s.run("while True:\n    pass")
    assert time.perf_counter() - t0 < 3.5 and res.interrupted
    assert {e.type for _, e in res.errors} == {"KeyboardInterrupt"}
    assert s.state == State.READY and s.eval("rank") == [0, 1, 2, 3]


def test_wrong_or_missing_key_is_refused_and_the_session_goes_on(attached):
    s, e = attached.s, attached.s.endpoint
    with pytest.raises(AuthenticationError):
        Client(("127.0.0.1", e.port), authkey=b"x" * 32)
    c = Client(("127.0.0.1", e.port))  # no key: its first message is not the answer to the challenge
    c.send(P.Hello("data", 0, 4, "intruder", 1, "0", "0"))
    deadline = time.monotonic() + 5
    while len([n for n in e.notes if "does not hold this session's key" in n]) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    c.close()
    assert len([n for n in e.notes if "does not hold this session's key" in n]) == 2, e.notes
    assert s.eval("rank") == [0, 1, 2, 3]


def test_other_versions_twice_joined_and_outside_ranks_are_refused(attached):
    e = attached.s.endpoint
    fv, tv = e.versions

    def hello(rank, versions=(fv, tv)):
        with Client(("127.0.0.1", e.port), authkey=e.key) as c:
            c.send(P.Hello("data", rank, 4, "node9", 99, *versions))
            return c.recv()

    old = hello(1, ("0.0.1", "1.0"))
    assert isinstance(old, P.Refused) and "fsdp_nb 0.0.1 with torch 1.0" in old.reason and f"fsdp_nb {fv}" in old.reason
    assert "\n" not in old.reason and e.notes[-1] == old.reason
    assert "not waiting for ranks" in hello(1).reason  # the session has all its ranks
    e._accepting = True  # as while it gathers
    try:
        e._joining = {0: attached.s._group.ranks[0]}
        assert "already joined" in hello(0).reason
        assert "ranks are 0 to 3" in hello(7).reason
    finally:
        e._accepting, e._joining = False, {}


def test_a_rank_with_other_versions_exits_non_zero_with_one_line(attached):
    e = attached.s.endpoint
    code = "import fsdp_nb; fsdp_nb.__version__ = '0.0.1'; from fsdp_nb.rank.attached import main; main()"
    env = {**os.environ, "PYTHONPATH": ROOT, "RANK": "0", "WORLD_SIZE": "4"}
    out = subprocess.run(
        [sys.executable, "-c", code, "--session", f"127.0.0.1:{e.port}", "--key-file", e.key_file],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("fsdp_nb.attach: refused rank 0")
    assert "fsdp_nb 0.0.1" in out.stderr and "install the same versions" in out.stderr


def test_exported_script_runs_under_two_torchrun_agents(attached, tmp_path):
    s = attached.s
    s.run("t = torch.tensor([rank * 3 + 1.0])\ndist.all_reduce(t)\nprint('total', t.item())").raise_errors()
    session_losses = s.run(TRAIN + "\nif rank == 0:\n    print('LOSSES', repr(losses))\nlosses").raise_errors().values
    text, warnings = s.export()
    assert warnings == [] and "--nnodes 2 --nproc-per-node 2 --rdzv-backend c10d" in text
    path = tmp_path / "exported.py"
    path.write_text(text)
    header = next(line for line in text.splitlines() if "--rdzv-endpoint HOST:29400" in line)
    rdzv = s.endpoint.rdzv_endpoint.rsplit(":", 1)[0] + f":{_free_port()}"
    argv = shlex.split(header.replace("HOST:29400", rdzv).replace("THIS_FILE", str(path)))
    argv[0] = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.PIPE, text=True,
                               stderr=subprocess.PIPE) for _ in range(2)]  # fmt: skip
    try:
        outs = [a.communicate(timeout=60) for a in agents]
        why = "\n".join(err[-1500:] for _, err in outs)
        assert [a.returncode for a in agents] == [0, 0], why
        # 1 + 4 + 7 + 10, as in the session; two ranks share an agent's stdout, so their print()s
        # can interleave word by word ("totaltotal 22.0\n 22.0"): count the values
        assert "".join(out for out, _ in outs).count("22.0") == 4, why
        # the same Trainer run as in the session, under the two agents: the same losses
        line = next(x for out, _ in outs for x in out.splitlines() if x.startswith("LOSSES "))
        script_losses = ast.literal_eval(line.removeprefix("LOSSES "))
        assert script_losses == pytest.approx(session_losses[0], abs=1e-6), why
    finally:
        stop_agents(agents)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_launch_magic_refuses_bad_attach_flags_in_one_line(bare_shell):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match=r"^-n 3 does not match --nnodes 2 x --nproc-per-node 2 = 4"):
        bare_shell.run_line_magic("fsdp_launch", "--listen 0 --nnodes 2 --nproc-per-node 2 -n 3")
    with pytest.raises(UsageError, match="needs all three"):
        bare_shell.run_line_magic("fsdp_launch", "--listen 0 --nnodes 2")
    with pytest.raises(UsageError, match=r"--listen 'x:y' is not valid"):
        bare_shell.run_line_magic("fsdp_launch", "--listen x:y --nnodes 1 --nproc-per-node 1")


def test_trainer_losses_match_a_local_session(attached):
    remote = attached.s.run(TRAIN + "\nlosses").raise_errors().values
    with Session(4, timeout=30) as local:
        here = local.run(TRAIN + "\nlosses").raise_errors().values
    assert len(remote[0]) == 4
    for a, b in zip(remote, here):
        assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6, (a, b)


def test_layout_memory_and_trace_read_attached_ranks(attached):
    """The kernel's readers of live ranks (session.layout, .memory, .trace) work on attached ranks too."""
    from fsdp_nb.layout import fsdp2_layout, specs_of
    from fsdp_nb.models import Layer

    s = attached.s
    build = "from fsdp_nb.sharding import shard\ntorch.manual_seed(0)\nattached_layer = shard(Layer(), FSDPConfig())"
    s.run(TRAIN + "\nfrom fsdp_nb.models import Layer\n" + build).raise_errors()
    read = s.layout("attached_layer")
    model = fsdp2_layout(specs_of(Layer()), 4)
    assert read.observed_ranks == (0, 1, 2, 3) and read.row_ranges == model.row_ranges
    assert [m.params for m in s.memory("attached_layer")] == list(model.bytes_per_rank)
    trace = s.trace("tr")
    units = len(trace.units)
    # TRAIN shards the GPT as one root unit, which keeps its gathered parameters for backward: one each
    assert units == 1 and [trace.count("all_gather", rank=r) for r in range(4)] == [1] * 4


def test_hung_collective_returns_within_timeout(attached):
    s = attached.s
    t0 = time.perf_counter()
    res = s.run("if rank == 0:\n    dist.barrier()")
    assert time.perf_counter() - t0 < 6 + 5 + 2
    assert res.errors and res.errors[0][0] == 0 and res.errors[0][1].timeout
    assert s.state == State.BROKEN


def test_restart_relaunches_and_a_dead_rank_and_agent_are_named(attached, capsys):
    old_agents, old_pids = attached.agents, attached.pids
    s = attached.start(restart=True)
    assert "start them again on each node" in capsys.readouterr().out
    for a in old_agents:
        assert a.wait(10) == 0  # the stopped ranks exited 0, so their agents did too
    stop_agents(old_agents, old_pids)
    assert s.eval("rank") == [0, 1, 2, 3]

    threading.Timer(1.0, lambda: os.kill(attached.pids[3], signal.SIGKILL)).start()
    t0 = time.perf_counter()
    res = s.run("import time\ntime.sleep(30)")
    assert time.perf_counter() - t0 < 1.0 + 5
    assert 3 in res.died and "was lost" in res.died[3] and s.state == State.BROKEN

    agent = next(a for a in attached.agents if _has_child(a.pid, attached.pids[0]))  # the node of ranks 0, 1
    os.killpg(agent.pid, signal.SIGKILL)
    t0 = time.monotonic()
    while any(row["alive"] for row in s.status()[:2]) and time.monotonic() - t0 < 5:
        time.sleep(0.1)
    assert all("was lost" in row["process"] for row in s.status()[:2]), s.status()


def _has_child(parent: int, child: int) -> bool:
    try:
        with open(f"/proc/{child}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1]) == parent
    except FileNotFoundError:
        return False


KERNEL = """
import sys
from fsdp_nb import Session
s = Session.listen("127.0.0.1:0", nnodes=2, nproc_per_node=1, wait=False, timeout=10, key_file=sys.argv[1])
print("COMMAND", s.endpoint.commands()[0], flush=True)
s.start()
s.run("import threading, time\\nfrom fsdp_nb.rank import pending\\n"
      "class W:\\n    what = 'a slow save'\\n    def __init__(self):\\n"
      "        self.t = threading.Thread(target=time.sleep, args=(1.5,)); self.t.start()\\n"
      "    def done(self): return not self.t.is_alive()\\n    def join(self, timeout): self.t.join(timeout)\\n"
      "pending.add(W())").raise_errors()
print("PIDS", *s.pids, flush=True)
import time; time.sleep(60)
"""


def test_kernel_death_makes_ranks_exit_0_within_10_s(tmp_path):
    kernel = subprocess.Popen(
        [sys.executable, "-c", KERNEL, str(tmp_path / "key")], env={**os.environ, "PYTHONPATH": ROOT},
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    agents, pids = [], []
    try:
        line = kernel.stdout.readline()
        while not line.startswith("COMMAND"):
            line = kernel.stdout.readline()
        argv = shlex.split(line.split(" ", 1)[1])
        argv[0] = os.path.join(os.path.dirname(sys.executable), "torchrun")
        env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
        agents = [subprocess.Popen(argv, env=env, start_new_session=True, stderr=subprocess.DEVNULL) for _ in range(2)]
        line = kernel.stdout.readline()
        while line and not line.startswith("PIDS"):
            line = kernel.stdout.readline()
        pids = [int(p) for p in line.split()[1:]]
        assert len(pids) == 2
        os.killpg(kernel.pid, signal.SIGKILL)
        t0 = time.monotonic()
        codes = [a.wait(10) for a in agents]
        assert codes == [0, 0] and time.monotonic() - t0 < 10
        assert not [p for p in pids if _alive(p)]
    finally:
        kernel.kill()
        kernel.wait()
        stop_agents(agents, pids)
