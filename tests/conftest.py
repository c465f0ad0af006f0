"""Shared fixtures: ONE real 2-rank gloo session for the whole test run.

Tests that break the session (dead ranks, stuck collectives) leave it BROKEN; the
`session` fixture restarts it before the next test, so every test starts READY.
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.pop("FSDP_NB_COLLATE", None)  # tests choose the output mode themselves
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def _shared_session():
    from fsdp_nb import Session

    s = Session(2, timeout=60)
    yield s
    s.close()


@pytest.fixture
def session(_shared_session):
    """The shared 2-rank session, READY (restarted if an earlier test broke it)."""
    from fsdp_nb.session.session import State

    if _shared_session.state != State.READY:
        _shared_session.restart() if _shared_session.state != State.CLOSED else _shared_session.start()
    return _shared_session


def _shell():
    from IPython.testing.globalipapp import get_ipython

    shell = get_ipython()
    if "FSDPMagics" not in shell.magics_manager.registry:
        shell.run_line_magic("load_ext", "fsdp_nb")
    return shell


@pytest.fixture
def bare_shell():
    """The IPython shell with no session attached (for launch-error tests)."""
    shell = _shell()
    magics = shell.magics_manager.registry["FSDPMagics"]
    saved, magics.session = magics.session, None
    yield shell
    magics.session = saved


@pytest.fixture
def ipshell(session):
    """A real in-process IPython shell with the extension loaded, bound to the shared session."""
    shell = _shell()
    magics = shell.magics_manager.registry["FSDPMagics"]
    magics.session = session
    if magics.dashboard not in session.event_handlers:
        session.event_handlers.append(magics.dashboard)
    yield shell
    session.event_handlers[:] = [h for h in session.event_handlers if h is not magics.dashboard]
    magics.session = None


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
