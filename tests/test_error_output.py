"""What a cell's error looks like: short when fsdp_nb explains it, whole otherwise, `%fsdp_tb` for the rest.

Real errors from real ranks (the shared session), rendered through a real IPython
shell as JupyterLab would receive them: tutorial 01's two expected refusals, an error
fsdp_nb words itself, and one it does not know.
"""

from __future__ import annotations

import re

import pytest

from fsdp_nb import RankError
from fsdp_nb.layout.rules import explain
from fsdp_nb.session import protocol as P
from fsdp_nb.session.error_text import POINTER, wrap
from fsdp_nb.session.results import CellResult

pytestmark = pytest.mark.timeout(90)

WIDTH = 100  # characters that fit a 950 px output area in JupyterLab's error font

SETUP = (
    "from torch.distributed.fsdp import FullyShardedDataParallel as FSDP\n"
    "from torch.distributed.fsdp import fully_shard\n"
    "from torch.distributed.device_mesh import init_device_mesh\n"
    "from fsdp_nb.models import Layer\n"
    "mesh = init_device_mesh('cpu', (world_size,))\n"
)
# Tutorial 01's cells, word for word.
FROZEN_FSDP1 = (
    'layer = Layer()\nlayer.l1.requires_grad_(False)\nFSDP(layer, device_id=torch.device("cpu"), use_orig_params=False)'
)
BF16_FSDP2 = "m4 = Layer(); m4.l2.to(torch.bfloat16)\nfully_shard(m4, mesh=mesh)\nm4(torch.randn(2, 4))"


def _fail(shell, capsys, source: str) -> tuple[RankError, list[str]]:
    """Run `source` as a %%fsdp cell that fails; the RankError, and the lines IPython printed for it."""
    capsys.readouterr()
    result = shell.run_cell("%%fsdp\n" + source)
    error = result.error_in_exec
    assert isinstance(error, RankError), result
    printed = capsys.readouterr()
    lines = error._render_traceback_()
    assert "\n".join(lines) in printed.out + printed.err  # what the user saw is this rendering
    return error, lines


def _tb(shell, capsys) -> str:
    capsys.readouterr()
    shell.run_line_magic("fsdp_tb", "")
    return capsys.readouterr().out


def _flat(lines: list[str]) -> str:
    """The rendering with its wrapping undone: each wrapped sentence back on one line."""
    return " ".join(line.strip() for line in lines)


def _assert_wrapped(lines: list[str], *originals: str) -> None:
    """At most WIDTH characters a line, and every word of each original text still whole."""
    assert max(len(line) for line in lines) <= WIDTH, max(lines, key=len)
    words = set("\n".join(lines).split())
    for text in originals:
        assert set(text.split()) <= words, set(text.split()) - words


@pytest.fixture
def shell(ipshell, session):
    session.run(SETUP).raise_errors()
    return ipshell


@pytest.mark.parametrize(
    "source, torch_line, user_line, deep_frame",
    [
        (
            FROZEN_FSDP1,
            "ValueError: Must flatten tensors with uniform `requires_grad` when `use_orig_params=False`",
            'line 3: FSDP(layer, device_id=torch.device("cpu"), use_orig_params=False)',
            'File "site-packages/torch/distributed/fsdp/_flat_param.py"',
        ),
        (
            BF16_FSDP2,
            "AssertionError: FSDP expects uniform original parameter dtype but got {torch.",
            "line 3: m4(torch.randn(2, 4))",
            'File "site-packages/torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py"',
        ),
    ],
    ids=["fsdp1-frozen", "fsdp2-bf16"],
)
def test_a_known_refusal_is_short_and_fsdp_tb_shows_it_whole(shell, capsys, source, torch_line, user_line, deep_frame):
    error, lines = _fail(shell, capsys, source)
    (ranks, remote), *more = error.groups()
    assert sorted(ranks) == [0, 1] and not more
    why = explain(remote.message)
    assert why is not None
    text = _flat(lines)
    # Short, in reading order, each thing once: header, the user's line, the explanation, the pointer.
    assert len(lines) <= 12, "\n".join(lines)
    assert "site-packages" not in text and "Traceback" not in text and 'File "' not in text
    assert lines[0].startswith("[ranks 0,1] " + torch_line[:40])
    assert text.count(torch_line) == 1 and text.count(f"fsdp_nb explains: {why}") == 1
    assert text.count(why[:30]) == 1  # the explanation once, not also somewhere else
    assert len(re.findall(r"<cell \d+>, " + re.escape(user_line), text)) == 1
    order = [text.index(torch_line), text.index(user_line), text.index(why), text.index(POINTER)]
    assert order == sorted(order) and text.count("%fsdp_tb") == 1
    _assert_wrapped(lines, remote.headline(), why, user_line)
    # %fsdp_tb: the whole traceback, torch's frames included, and nothing said twice there either.
    whole = _tb(shell, capsys)
    assert deep_frame in whole and re.search(r'File "<cell \d+>", line 3, in <module>', whole)
    assert _flat(whole.splitlines()).count(torch_line) == 2  # the header, and the traceback's last line
    assert "fsdp_nb explains" not in whole and "%fsdp_tb" not in whole
    assert whole.rstrip("\n") == error.traceback()


def test_an_error_fsdp_nb_does_not_know_is_shown_whole(shell, capsys):
    error, lines = _fail(shell, capsys, "def helper():\n    return torch.zeros(2).view(3)\nhelper()")
    text = "\n".join(lines)
    message = "RuntimeError: shape '[3]' is invalid for input of size 2"
    assert lines[0] == f"[ranks 0,1] {message}" and lines[-1] == f"  {message}"
    assert re.search(r'File "<cell \d+>", line 3, in <module>\n +helper\(\)', text), text
    assert re.search(r'File "<cell \d+>", line 2, in helper\n +return torch.zeros\(2\).view\(3\)', text), text
    assert "%fsdp_tb" not in text and "fsdp_nb explains" not in text and "fsdp_nb/" not in text
    assert _tb(shell, capsys).rstrip("\n") == text  # already whole: %fsdp_tb shows the same


def test_an_error_fsdp_nb_words_itself_shows_its_message_once_and_torchs_line_once(shell, capsys):
    error, lines = _fail(
        shell,
        capsys,
        "from fsdp_nb import FSDPConfig, shard\n"
        "layer = Layer()\nlayer.l1.requires_grad_(False)\n"
        "shard(layer, FSDPConfig(fsdp_version=1, use_orig_params=False))",
    )
    remote = error.groups()[0][1]
    text = _flat(lines)
    torch_line = "ValueError: Must flatten tensors with uniform `requires_grad` when `use_orig_params=False`"
    assert remote.message.startswith("FSDP1 with use_orig_params=False flattens each unit's parameters")
    assert "shown above" not in remote.message  # nothing points the wrong way
    assert text.count(remote.message) == 1 and text.count(torch_line) == 1
    assert text.count("torch said: " + torch_line) == 1
    assert re.search(r"<cell \d+>, line 4: shard\(layer, FSDPConfig\(fsdp_version=1, use_orig_params=False\)\)", text)
    assert "fsdp_nb explains" not in text  # its own words explain it: no second explanation
    assert "site-packages" not in text and "fsdp_nb/sharding.py" not in text and len(lines) <= 12
    _assert_wrapped(lines, remote.headline(), torch_line)
    whole = _tb(shell, capsys)
    assert "The above exception was the direct cause of the following exception:" in whole
    assert 'File "site-packages/torch/distributed/fsdp/_flat_param.py"' in whole
    assert 'File "fsdp_nb/sharding.py"' in whole


@pytest.mark.parametrize(
    "source, kind, words",
    [
        (
            "from fsdp_nb import load_checkpoint\nload_checkpoint(Layer(), None, '/no/such/checkpoint')",
            "CheckpointError",
            "/no/such/checkpoint",
        ),
        (
            "from fsdp_nb import _torch\n_torch.resolve('torch.nn.NoSuchThing')",
            "TorchInternalsError",
            "torch.nn.NoSuchThing",
        ),
    ],
    ids=["checkpoint", "torch-internals"],
)
def test_fsdp_nbs_own_errors_are_short_and_say_their_cause_once(shell, capsys, source, kind, words):
    error, lines = _fail(shell, capsys, source)
    remote = error.groups()[0][1]
    text = _flat(lines)
    assert remote.type == kind and words in remote.message and remote.short
    assert lines[0].startswith(f"[ranks 0,1] {kind}: ") and text.count(remote.message) == 1
    assert re.search(r"<cell \d+>, line 2: ", text) and text.endswith(POINTER)
    assert "Traceback" not in text and len(lines) <= 8
    assert "because of" not in text  # TorchInternalsError quotes its AttributeError already: not twice
    _assert_wrapped(lines, remote.headline())


def test_a_peer_failure_and_its_cause_are_both_short_with_one_pointer(shell, capsys):
    refusal = "Must flatten tensors with uniform dtype but got torch.float32 and torch.bfloat16"
    error, lines = _fail(
        shell,
        capsys,
        f"from fsdp_nb.phases import fail_together\nwith fail_together('demo'):\n"
        f"    if rank == 1:\n        raise ValueError('{refusal}')",
    )
    heads = [line for line in lines if line.startswith("[rank")]
    assert sorted(h.split(":")[0] for h in heads) == ["[rank 0] PeerFailure", "[rank 1] ValueError"]  # any order
    text = _flat(lines)
    assert text.count(f"fsdp_nb explains: {explain(refusal)}") == 1  # not again under the PeerFailure
    assert "this rank stopped there too" in text and text.count("%fsdp_tb") == 1 and lines[-1] == POINTER
    _assert_wrapped(lines, refusal, explain(refusal))


def test_fsdp_tb_before_any_failure_says_so_in_one_line(bare_shell, capsys):
    from fsdp_nb import Session

    bare_shell.run_line_magic("fsdp_tb", "")  # no session at all
    Session(2, start=False).activate()  # a session, with no failed cell
    bare_shell.run_line_magic("fsdp_tb", "")
    assert capsys.readouterr().out == "fsdp_nb: no cell has failed in this session yet\n" * 2


def test_the_session_keeps_the_last_failure_for_python_users(session):
    result = session.run(SETUP + FROZEN_FSDP1)
    assert session.last_error is not None and session.last_error.result is result
    assert "_flat_param.py" in session.last_error.traceback()
    session.run("1")  # a cell that works keeps the last failure
    assert session.last_error.result is result


def _remote(headline: str, short: tuple[str, ...] = ()) -> P.RemoteError:
    kind, _, message = headline.partition(": ")
    traceback = f'Traceback (most recent call last):\n  File "<cell 1>", line 1\n{headline}\n'
    return P.RemoteError(kind, message, traceback, short=short)


def test_died_stuck_and_broken_lines_follow_the_short_error_and_its_pointer():
    long_why = "a reason " * 20
    result = CellResult(ranks=[0, 1], world_size=2, died={1: "exited with signal 9 (SIGKILL)"}, stuck=[0])
    result.broken = long_why.strip()
    result.dones[0] = P.Done(1, 0, error=_remote("CheckpointError: bad", ("<cell 1>, line 1: load()",)))
    result.order.append(0)
    lines = RankError(result)._render_traceback_()
    assert lines[:4] == [
        "[rank 0] CheckpointError: bad",
        "  <cell 1>, line 1: load()",
        POINTER,
        "[rank 1] exited with signal 9 (SIGKILL)",
    ]
    assert lines[4] == "rank 0 did not finish (stuck in a collective or ignoring the interrupt)"
    assert lines[5].startswith("The session is broken (a reason") and lines[-1].endswith("(or session.restart()).")
    assert all(len(line) <= WIDTH for line in lines) and len(lines) > 6  # the long reason was wrapped
    assert RankError(result).traceback().splitlines()[1] == "  Traceback (most recent call last):"


def test_wrapping_breaks_only_between_words():
    text = "Use use_orig_params=True, wrap the frozen layer in its own unit, or call fully_shard on the odd-dtype " * 3
    lines = wrap(text, "  ")
    assert all(len(line) <= WIDTH for line in lines) and lines[0].startswith("  Use")
    assert all(line.startswith("    ") for line in lines[1:])  # continuation lines sit deeper than the first
    assert " ".join(line.strip() for line in lines) == text.strip()  # nothing lost, nothing split
    path = "site-packages/" + "x" * 120 + ".py"
    assert wrap(f"see {path} now") == ["see", f"    {path}", "    now"]  # too long for a line: whole, alone
