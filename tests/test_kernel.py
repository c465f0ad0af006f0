"""The magics in real Jupyter kernels (jupyter_client), as a notebook drives them.

Covers what only a real kernel shows: interrupts sent by Jupyter, kernels that are
SIGKILLed, restarted or shut down (no orphaned ranks), and two kernels at once.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

jupyter_client = pytest.importorskip("jupyter_client")

pytestmark = pytest.mark.timeout(120)


def _alive(pid: int) -> bool:
    """True if `pid` runs and is not a zombie (reparented zombies may linger in containers)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wait_gone(pids, seconds=5.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


class Kernel:
    def __init__(self):
        env = {k: v for k, v in os.environ.items() if k != "FSDP_NB_COLLATE"}  # live output, as users get it
        env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg")
        self.km = jupyter_client.KernelManager(kernel_name="python3")
        self.km.start_kernel(env=env)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def run(self, code: str, timeout: float = 60) -> tuple[dict, str, list[dict]]:
        """Execute and wait; return (reply content, all text output, error contents)."""
        texts, errors = [], []

        def hook(msg):
            t, c = msg["msg_type"], msg["content"]
            if t == "stream":
                texts.append(c["text"])
            elif t == "error":
                errors.append(c)
                texts.append("\n".join(c["traceback"]))
            elif t in ("execute_result", "display_data"):
                texts.append(c["data"].get("text/plain", ""))

        reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        return reply["content"], "".join(texts), errors

    def pids(self) -> list[int]:
        _, out, _ = self.run("import fsdp_nb; print(fsdp_nb.current_session().pids)")
        return eval(out.strip())

    def start_interrupt_after(self, code: str, delay: float) -> tuple[float, dict, list[dict]]:
        """Send `code`, interrupt the kernel after `delay` s; return (seconds to reply, reply, iopub errors)."""
        msg_id = self.kc.execute(code)
        time.sleep(delay)
        t0 = time.monotonic()
        self.km.interrupt_kernel()
        reply = self.kc.get_shell_msg(timeout=30)
        took = time.monotonic() - t0
        assert reply["parent_header"]["msg_id"] == msg_id
        errors = []
        while True:
            msg = self.kc.get_iopub_msg(timeout=10)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "error":
                errors.append(msg["content"])
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        return took, reply["content"], errors

    def close(self, now: bool = True):
        self.kc.stop_channels()
        if self.km.is_alive():
            self.km.shutdown_kernel(now=now)


@pytest.fixture(scope="module")
def kernel():
    k = Kernel()
    content, out, _ = k.run("%load_ext fsdp_nb\n%fsdp_launch -n 2")
    assert content["status"] == "ok", out
    assert "fsdp_nb: 2 ranks ready (backend gloo, device cpu, torch 2." in out
    yield k
    k.close()


def test_cell_runs_on_ranks_in_a_real_kernel(kernel):
    content, out, _ = kernel.run("%%fsdp --collate\nprint('hi', rank)\nrank")
    assert content["status"] == "ok"
    assert out == "[rank 0] hi 0\n[rank 1] hi 1\nOut[rank 0]: 0\nOut[rank 1]: 1\n"


def test_exception_shows_remote_traceback_then_next_cell_works(kernel):
    content, out, errors = kernel.run(
        "%%fsdp\nimport time\nif rank == 0: time.sleep(0.2)\nraise ValueError(f'bad {rank}')"
    )
    assert content["status"] == "error" and errors[0]["ename"] == "RankError"
    tb = errors[0]["traceback"]
    # the same error with each rank's own number: merged, first failing rank's words, the difference said
    assert tb[0] == "[ranks 0,1] ValueError: bad 1"
    assert "  (rank 1's message; rank 0 said the same with other numbers or another set order)" in tb
    assert any('File "<cell' in line for line in tb)
    content, out, _ = kernel.run("%%fsdp\nrank + 1")
    assert content["status"] == "ok" and "Out[rank 1]: 2" in out


@pytest.mark.parametrize("cell", ["import time\ntime.sleep(600)", "while True:\n    pass"])
def test_interrupt_reaches_ranks_and_session_survives(kernel, cell):
    took, reply, errors = kernel.start_interrupt_after("%%fsdp\n" + cell, delay=1.5)
    assert took < 2.0, took
    assert reply["status"] == "error"
    assert "KeyboardInterrupt" in "\n".join(errors[0]["traceback"])
    content, out, _ = kernel.run("%%fsdp\n(lambda t: (dist.all_reduce(t), t.item())[1])(torch.ones(1))")
    assert content["status"] == "ok" and "Out[rank 0]: 2.0" in out


def test_interrupting_an_idle_kernel_keeps_the_ranks(kernel):
    pids = kernel.pids()
    kernel.km.interrupt_kernel()
    time.sleep(1.0)
    assert all(_alive(p) for p in pids)
    content, out, _ = kernel.run("%%fsdp\nrank")
    assert content["status"] == "ok" and "Out[rank 1]: 1" in out and kernel.pids() == pids


def test_bad_input_is_a_one_line_usage_error_in_a_real_kernel(kernel):
    for line, message in [
        ("%fsdp_launch -n 2", "already running"),
        ("%fsdp_launch --bogus", "unrecognized arguments"),
        ("%fsdp_pull not_there", "have no variable 'not_there'"),
    ]:
        content, out, _ = kernel.run(line)  # IPython prints a UsageError as one stderr line, no traceback
        assert content["status"] == "error" and content["ename"] == "UsageError"
        assert message in content["evalue"] and "\n" not in content["evalue"]
        assert out.strip() == f"UsageError: {content['evalue']}"


def test_dead_rank_in_a_real_kernel_is_reported_then_restart_works(kernel):
    t0 = time.monotonic()
    content, out, errors = kernel.run(
        "%%fsdp\nimport os, signal\nif rank == 1: os.kill(os.getpid(), signal.SIGKILL)\ndist.barrier()"
    )
    assert time.monotonic() - t0 < 1.5
    assert errors[0]["evalue"].startswith("rank 1 exited with signal 9 (SIGKILL)")
    content, out, _ = kernel.run("%%fsdp\n1")
    assert content["ename"] == "UsageError" and "run %fsdp_restart" in content["evalue"]
    assert kernel.run("%fsdp_restart")[0]["status"] == "ok"
    content, out, _ = kernel.run("%%fsdp\nrank")
    assert content["status"] == "ok" and "Out[rank 1]: 1" in out


def test_two_kernels_at_once_and_sigkill_leaves_no_orphans(kernel):
    other = Kernel()
    try:
        # Start the second kernel's session while the first restarts its own: no port clash.
        other.kc.execute("%load_ext fsdp_nb\n%fsdp_launch -n 2")
        content, out, _ = kernel.run("%fsdp_restart")
        assert content["status"] == "ok", out
        reply = other.kc.get_shell_msg(timeout=90)
        assert reply["content"]["status"] == "ok"
        for k in (kernel, other):
            content, out, _ = k.run("%%fsdp\n(lambda t: (dist.all_reduce(t), t.item())[1])(torch.ones(1) * (rank + 1))")
            assert content["status"] == "ok" and "Out[rank 0]: 3.0" in out, out
        pids = other.pids()
        assert set(pids).isdisjoint(kernel.pids())
        os.kill(other.km.provisioner.process.pid, signal.SIGKILL)
        assert _wait_gone(pids) == [], "ranks outlived a SIGKILLed kernel"
    finally:
        other.close()


@pytest.mark.parametrize("how", ["restart", "shutdown"])
def test_kernel_restart_and_shutdown_leave_no_orphans(how):
    k = Kernel()
    try:
        content, out, _ = k.run("%load_ext fsdp_nb\n%fsdp_launch -n 2 --timeout 3")
        assert content["status"] == "ok", out
        if how == "shutdown":  # and on the way: a hung collective in a real kernel
            t0 = time.monotonic()
            content, out, errors = k.run("%%fsdp\nif rank == 1:\n    raise ValueError('r1')\ndist.barrier()")
            assert time.monotonic() - t0 < 3 + 5
            assert errors[0]["evalue"] == "rank 1 failed first: ValueError: r1; rank 0 stuck in a collective"
            assert "Run %fsdp_restart" in out
            assert k.run("%fsdp_restart")[0]["status"] == "ok"
            content, out, _ = k.run("%%fsdp\n(lambda t: (dist.all_reduce(t), t.item())[1])(torch.ones(1))")
            assert content["status"] == "ok" and "Out[rank 1]: 2.0" in out, out
        pids = k.pids()
        if how == "restart":
            k.km.restart_kernel(now=False)
        else:
            k.km.shutdown_kernel(now=False)
        assert _wait_gone(pids) == [], f"ranks outlived a kernel {how}"
    finally:
        k.close()
