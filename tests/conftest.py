"""Shared fixtures: ONE real 2-rank gloo session for the whole test run, and one of 4 ranks.

Tests that break the session (dead ranks, stuck collectives) leave it BROKEN; the
`session` fixture restarts it before the next test, so every test starts READY.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.pop("FSDP_NB_COLLATE", None)  # tests choose the output mode themselves
os.environ.setdefault("MPLBACKEND", "Agg")
# Nothing touches the network: Hugging Face models come from configs, tokenizers are trained here.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no tokenizer threads beside the ranks' one


@pytest.fixture(scope="session")
def _shared_session():
    from fsdp_nb import Session

    s = Session(2, timeout=60)
    yield s
    s.close()


def ready(session):
    """`session`, READY: restarted if an earlier test broke it, started again if it was closed."""
    from fsdp_nb.session import State

    if session.state != State.READY:
        session.restart() if session.state != State.CLOSED else session.start()
    return session


@pytest.fixture
def session(_shared_session):
    """The shared 2-rank session, READY (restarted if an earlier test broke it)."""
    return ready(_shared_session)


@pytest.fixture(scope="session")
def session4():
    """ONE 4-rank session for every module that needs 4 ranks (HSDP, TP, their traces and checkpoints).

    Started when a module first asks for it; each module runs its own setup cell on it and
    takes it READY (`ready`), so the modules share one start of 4 ranks instead of one each.
    """
    from fsdp_nb import Session

    s = Session(4, timeout=60)
    yield s
    s.close()


def _shell():
    from IPython.testing.globalipapp import get_ipython

    shell = get_ipython()
    if "FSDPMagics" not in shell.magics_manager.registry:
        shell.run_line_magic("load_ext", "fsdp_nb")
    return shell


@pytest.fixture
def bare_shell():
    """The IPython shell with no current session (for launch-error tests)."""
    from fsdp_nb.session import session as module

    shell = _shell()
    saved, module._current = module._current, None
    yield shell
    module._current = saved


@pytest.fixture
def ipshell(session):
    """A real in-process IPython shell with the extension loaded, driving the shared session."""
    from fsdp_nb.session import session as module

    shell = _shell()
    saved = module._current
    session.activate()
    yield shell
    module._current = saved


class Recorder:
    """An output sink that keeps what arrives, with arrival times."""

    def __init__(self):
        import time

        self.clock = time.perf_counter
        self.items: list[tuple[float, int, str, object]] = []

    def stream(self, rank, name, text):
        self.items.append((self.clock(), rank, name, text))

    def display(self, rank, data, metadata):
        self.items.append((self.clock(), rank, "display", data))

    def finish(self):
        pass

    def text(self, rank, name="stdout") -> str:
        return "".join(t for _, r, n, t in self.items if r == rank and n == name)


@pytest.fixture
def recorder():
    return Recorder()


def _torchrun(nprocs: int, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node=NPROCS ARGS...`, one thread per rank; a non-zero exit fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nprocs}", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture
def torchrun():
    return _torchrun
