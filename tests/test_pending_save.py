"""No save is lost: every way a session ends first finishes an async checkpoint still being written.

To make "still being written" certain rather than a race, the ranks' publication step
(`store.publish`) is slowed by a few seconds; every check then starts while the save
is pending. Each test runs its own session (or its own kernel process), since each
one ends it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fsdp_nb.checkpoint import store

SLOW_SAVE = """
import time, warnings
warnings.filterwarnings("ignore")
import torch
from fsdp_nb import FSDPConfig, shard, save_checkpoint
from fsdp_nb.checkpoint import store
from fsdp_nb.models import GPT, GPTConfig
from fsdp_nb.rank import pending
publish = store.publish
def slow_publish(tmp, path):
    time.sleep({delay})  # the write of a big model, in short
    publish(tmp, path)
store.publish = slow_publish
model = shard(GPT(GPTConfig.debug(), seed=0), FSDPConfig(fsdp_version={version}))
opt = torch.optim.AdamW(model.parameters())
handle = save_checkpoint(model, opt, {path!r}, async_save=True)
still_writing = not handle.done()
"""


def start_slow_save(session, path, version=2, delay=2.0):
    session.run(textwrap.dedent(SLOW_SAVE.format(delay=delay, version=version, path=str(path)))).raise_errors()
    assert session.eval("still_writing") == [True, True]


def alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        try:  # a zombie (exited, not yet reaped) is gone for our purposes
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    continue
        except OSError:
            continue
        out.append(pid)
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("how", "version"), [("close", 1), ("restart", 2)])
def test_close_and_restart_wait_for_a_pending_save_and_say_so(tmp_path, capsys, how, version):
    from fsdp_nb import Session

    s = Session(2, timeout=30)
    try:
        start_slow_save(s, tmp_path / "ckpt", version=version)
        t0 = time.monotonic()
        s.close() if how == "close" else s.restart()
        waited = time.monotonic() - t0
    finally:
        s.close()
    assert waited > 1.0  # it did wait for the write
    out = capsys.readouterr().out
    assert out.count("waiting up to 120 s for checkpoint") == 1 and "abandoned" not in out
    assert store.inspect(tmp_path / "ckpt").has_optimizer  # complete: a fresh session can load it


@pytest.mark.timeout(60)
def test_a_save_past_the_bound_is_abandoned_by_name_and_no_rank_lives_on(tmp_path, capsys):
    from fsdp_nb import Session

    s = Session(2, timeout=30)
    try:
        start_slow_save(s, tmp_path / "ckpt", delay=30)
        s.run("pending.FINISH_TIMEOUT_S = 1.0").raise_errors()  # the bound, shortened for the test
        pids = s.pids
        t0 = time.monotonic()
        s.close()
        waited = time.monotonic() - t0
    finally:
        s.close()
    assert waited < 15 and alive(pids) == []
    out = capsys.readouterr().out
    assert f"abandoned checkpoint {tmp_path / 'ckpt'}" in out
    with pytest.raises(store.CheckpointError, match="incomplete"):
        store.inspect(tmp_path / "ckpt")


KERNEL = """
import os, signal, sys, textwrap
sys.path.insert(0, {tests!r})
from test_pending_save import SLOW_SAVE
from fsdp_nb import Session
s = Session(2, timeout=30)
s.run(textwrap.dedent(SLOW_SAVE.format(delay=3.0, version=2, path={path!r}))).raise_errors()
print("PIDS", *s.pids, flush=True)
if {how!r} == "dies":
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(0)  # a clean exit: atexit closes the session
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["dies", "exits"])
def test_a_kernel_that_exits_or_dies_leaves_its_pending_save_finished_and_no_orphans(tmp_path, how):
    code = KERNEL.format(tests=os.path.dirname(__file__), path=str(tmp_path / "ckpt"), how=how)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=80, env=env)
    assert done.returncode == (-signal.SIGKILL if how == "dies" else 0), done.stderr[-2000:]
    pids = [int(p) for p in next(line for line in done.stdout.splitlines() if line.startswith("PIDS")).split()[1:]]
    deadline = time.monotonic() + 30
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive(pids) == []  # the ranks finished the save, then exited: no orphans
    assert store.inspect(tmp_path / "ckpt").has_optimizer
