"""Checkpoints of tensor parallelism (TP) + FSDP2 on a 2×2 mesh: every direction loads exactly, and merges.

Under TP a planned weight is a DTensor on the whole (dp_shard, tp) mesh, colwise ones as
`(_StridedShard(dim=0, sf=2), Shard(dim=0))`, while the parameters the plan leaves out stay
on the 1-D dp_shard mesh. DCP stores each rank's block at its global offsets, so a TP
checkpoint loads into plain FSDP2 at 2 ranks, a 1-D checkpoint into TP, and `merge_weights`
reads the blocks into whole tensors in one process. The Layer splits unevenly (l1's 6 rows:
3 per TP rank, then 2 + 1 per data-parallel rank), the GPT evenly.

The saves and loads run once, in the module fixture `done`: the shared 2-rank session saves
the 1-D checkpoints; ONE 4-rank session saves the TP ones (sharded, async, full, and a
Trainer's), loads both kinds, and merges on rank 0 alone while the other ranks go on; then
the 2-rank session loads the TP checkpoints. Each load is compared with what the saver
gathered (torch.equal, AdamW state by key), and training on from it with the saver's own
continuation: the same bits on the same layout, float rounding across layouts. TP peers
take the same rows, so 2×2 and 1-D at 2 ranks train on the same data.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from test_checkpoint import HELPERS, assert_same_state
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from fsdp_nb import cli
from fsdp_nb.checkpoint import merge_weights
from fsdp_nb.models import GPT, GPTConfig, Layer
from fsdp_nb.session.output import Silent

STEPS, MORE = 2, 2  # steps before the save; steps on from it, by the saver and by every loader
TRAINER = dict(steps=4, global_batch_size=4, lr=3e-3, warmup_steps=1, log_interval=0)  # checkpoint at step 2

SETUP = (
    HELPERS
    + """
import warnings
from fsdp_nb.checkpoint import merge_weights
from fsdp_nb.models import Layer
warnings.filterwarnings("ignore")

def build_as(kind, tp, seed=1):
    wrap = "TRANSFORMER_BASED_WRAP" if kind == "gpt" else "NO_WRAP"
    torch.manual_seed(seed)
    plain = GPT(GPTConfig.debug(), seed=seed) if kind == "gpt" else Layer()
    model = shard(plain, FSDPConfig(fsdp_version=2, tp_size=tp, auto_wrap_policy=wrap))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

def inputs(kind, step):  # the global batch of `step`, the same on every rank
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, 256, (4, 16), generator=g) if kind == "gpt" else torch.randn(4, 4, generator=g)

def output(kind, model, x):
    return model(x)[0] if kind == "gpt" else model(x)

def train_as(kind, tp, model, opt, steps, start=0):
    dp, n = rank // tp, world_size // tp  # TP peers take the same rows
    losses = []
    for step in range(start, start + steps):
        x = inputs(kind, step)
        x = x[len(x) // n * dp : len(x) // n * (dp + 1)]
        loss = model(x, x)[1] if kind == "gpt" else model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(t.item() / world_size)
    return losses

saved, loaded, outputs, trainer_losses = {}, {}, {}, {}

def save_as(name, kind, tp, state_dict_type="SHARDED_STATE_DICT", async_save=False):
    model, opt = build_as(kind, tp)
    train_as(kind, tp, model, opt, STEPS)
    handle = save_checkpoint(model, opt, f"{root}/{name}", state_dict_type=state_dict_type, async_save=async_save)
    state = full(model, opt)  # after the save: its own gather is the first (see QUIET_SAVE)
    with torch.no_grad():
        outputs[name] = output(kind, model, inputs(kind, 99)).clone()
    more = train_as(kind, tp, model, opt, MORE, start=STEPS)  # with async_save, while the shards are written
    if handle is not None:
        handle.wait()
    saved[name] = state, more

def load_as(case, name, tp):
    kind = name.split("-")[0]
    model, opt = build_as(kind, tp, seed=7)  # other weights: everything must come from the file
    load_checkpoint(model, opt, f"{root}/{name}")
    loaded[case] = name, full(model, opt), train_as(kind, tp, model, opt, MORE, start=STEPS)

def trainer_run(case, tp, seed, **kwargs):
    data = ByteBlocks(stdlib_corpus(40_000), 16)
    fsdp = FSDPConfig(tp_size=tp, auto_wrap_policy="TRANSFORMER_BASED_WRAP")
    trainer = Trainer(GPT(GPTConfig.debug(), seed=seed), data, TrainConfig(**TRAINER), fsdp=fsdp, **kwargs)
    trainer_losses[case] = [r["loss"] for r in trainer.fit()]
"""
)


QUIET_SAVE = """
import logging
from fsdp_nb._torch import redistribute_logger
from fsdp_nb.checkpoint.quiet import quiet

class Kept(logging.Handler):  # DTensor's records, as its logger hands them to its handlers
    def emit(self, record):
        logged.append(record.getMessage())

logged = []
redistribute_logger().addHandler(kept := Kept())
save_as('gpt-tp-full', 'gpt', 2, state_dict_type='FULL_STATE_DICT')  # gathers (dp_shard, tp) DTensors
# torch gives the notice once per mesh and process, and these ranks may have gathered on an equal
# mesh before: the filter itself is checked with the notice as DTensor words it
NOTICE = "While redistributing from %s to %s, %d sequential %s operations will be performed."
with quiet():
    redistribute_logger().warning(NOTICE, "(S, S)", "(R, R)", 2, "all_gather")
redistribute_logger().warning(NOTICE, "(P, P)", "(R, R)", 2, "all_reduce")  # outside quiet(): heard
redistribute_logger().removeHandler(kept)
"""
FOUR_RANKS = """
save_as('gpt-tp', 'gpt', 2)
save_as('layer-tp', 'layer', 2, async_save=True)
live_merged = str(merge_weights(f'{root}/gpt-tp', f'{root}/merged-live')) if rank == 0 else None
for name in ('gpt-tp', 'layer-tp', 'gpt-fsdp2-full', 'layer-fsdp2'):
    load_as(f'{name} -> tp', name, 2)  # rank 0 merged alone above: the collectives here still line up
trainer_run('tp', 2, seed=2, checkpoint_dir=f'{root}/trainer-tp', checkpoint_every=2)
"""


def run(session, *cells: str) -> None:
    for cell in cells:
        session.run(textwrap.dedent(cell), output=Silent()).raise_errors()


@pytest.fixture(scope="module")
def done(_shared_session, session4, tmp_path_factory):
    """Every save, load and merge, run once: `saved` {checkpoint: (state, losses on from it)}, `loaded`
    {case: (checkpoint, state, losses on from it)}, the saved models' `outputs`, the Trainers' losses,
    the file rank 0 merged inside the job, and what DTensor `logged` on rank 0."""
    from conftest import ready

    root = tmp_path_factory.mktemp("tp-checkpoints")
    two = ready(_shared_session)
    found = dict(root=root, saved={}, loaded={}, outputs={}, trainer_losses={})

    def collect(session):
        for key in ("saved", "loaded", "outputs", "trainer_losses"):
            found[key].update(session.eval(key)[0])

    cells = (SETUP, f"root, STEPS, MORE, TRAINER = {str(root)!r}, {STEPS}, {MORE}, {TRAINER!r}")
    run(two, *cells, "save_as('gpt-fsdp2-full', 'gpt', 1, 'FULL_STATE_DICT'); save_as('layer-fsdp2', 'layer', 1)")
    four = ready(session4)  # the shared one: left open for the other 4-rank modules
    run(four, *cells)
    run(four, QUIET_SAVE)
    found["logged"] = four.eval("logged")[0]
    run(four, FOUR_RANKS)
    collect(four)
    found["live_merged"] = four.eval("live_merged")[0]
    run(two, "for name in ('gpt-tp', 'layer-tp', 'gpt-tp-full'): load_as(f'{name} -> fsdp2', name, 1)")
    run(two, "trainer_run('tp -> 1d', 1, seed=99, resume_from=f'{root}/trainer-tp/step-000002')")
    collect(two)
    return found


def check(done, case: str, same_layout: bool) -> None:
    """The load holds exactly what was saved, and training goes on as the saver's own run went on."""
    name, state, losses = done["loaded"][case]
    saved_state, saved_losses = done["saved"][name]
    some = next(iter(saved_state["optim"].values()))
    assert not torch.equal(some["exp_avg"], some["exp_avg_sq"])  # else a swap of the two could not be seen
    assert_same_state(state, saved_state)  # every parameter and AdamW tensor, torch.equal, by key
    if same_layout:  # the same ranks, the same reductions: the same bits
        assert losses == saved_losses, case
    else:  # TP sums partial products that one rank computes whole: float rounding only
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(saved_losses), rtol=1e-6, atol=1e-6, msg=case)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", ["gpt-tp -> tp", "layer-tp -> tp"])  # layer-tp: an async save
def test_a_tp_checkpoint_loads_back_into_tp_exactly(done, case):
    check(done, case, same_layout=True)


@pytest.mark.parametrize("case", ["gpt-tp -> fsdp2", "layer-tp -> fsdp2", "gpt-tp-full -> fsdp2"])
def test_a_tp_checkpoint_loads_into_plain_fsdp2_at_2_ranks(done, case):
    check(done, case, same_layout=False)


@pytest.mark.parametrize("case", ["gpt-fsdp2-full -> tp", "layer-fsdp2 -> tp"])
def test_a_plain_fsdp2_checkpoint_loads_into_tp(done, case):
    check(done, case, same_layout=False)


def test_a_trainer_under_tp_resumes_under_plain_fsdp2(done):
    """The TP Trainer's step-2 checkpoint, resumed by a 1-D Trainer at 2 ranks, trains steps 3-4 as TP did."""
    straight, resumed = done["trainer_losses"]["tp"], done["trainer_losses"]["tp -> 1d"]
    assert len(straight) == TRAINER["steps"] and straight[2] != straight[3]
    assert resumed[:2] == straight[:2]  # the history the checkpoint carried
    assert resumed == pytest.approx(straight, abs=1e-6, rel=0)


def test_tp_shards_are_stored_once_at_their_global_offsets(done):
    """DCP keeps one copy of what TP peers share (rowwise biases) and puts `_StridedShard` blocks in place."""
    for name in ("gpt-tp", "layer-tp"):
        metadata = FileSystemReader(str(done["root"] / name)).read_metadata()
        for key, m in metadata.state_dict_metadata.items():
            if isinstance(m, TensorStorageMetadata):
                assert sum(c.sizes.numel() for c in m.chunks) == m.size.numel(), (name, key)
    chunks = FileSystemReader(str(done["root"] / "layer-tp")).read_metadata().state_dict_metadata
    # l1.weight (6, 4), colwise: TP rank t holds rows [3t, 3t + 3), split 2 + 1 over the two dp ranks
    rows = sorted((c.offsets[0], c.sizes[0]) for c in chunks["model.l1.weight"].chunks)
    assert rows == [(0, 2), (2, 1), (3, 2), (5, 1)]
    # l2.weight (6, 6), rowwise: TP rank t holds columns [3t, 3t + 3), rows 3 + 3 over the dp ranks
    blocks = sorted((tuple(c.offsets), tuple(c.sizes)) for c in chunks["model.l2.weight"].chunks)
    assert blocks == [((r, c), (3, 3)) for r in (0, 3) for c in (0, 3)]


def _plain(kind: str, weights: dict) -> torch.nn.Module:
    model = GPT(GPTConfig.debug(), seed=123) if kind == "gpt" else Layer()
    model.load_state_dict(weights, strict=True)  # the plain model's own names and shapes
    return model.eval()


def _output(kind: str, model, step: int = 99) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)  # `inputs(kind, 99)` of the ranks
    x = torch.randint(0, 256, (4, 16), generator=g) if kind == "gpt" else torch.randn(4, 4, generator=g)
    with torch.no_grad():
        return model(x)[0] if kind == "gpt" else model(x)


@pytest.mark.parametrize("name", ["gpt-tp", "layer-tp", "gpt-tp-full"])
def test_merge_of_a_tp_checkpoint_is_the_full_model(done, tmp_path, name):
    """The merged file holds the TP model's full parameters bit for bit; a plain model built from it
    computes what the TP model computed on the ranks."""
    kind, saved_model = name.split("-")[0], done["saved"][name][0]["model"]
    weights = torch.load(merge_weights(done["root"] / name, tmp_path, safe_serialization=False), weights_only=True)
    assert sorted(weights) == sorted(saved_model)
    for key, value in saved_model.items():
        assert torch.equal(weights[key], value), key
    merged = _output(kind, _plain(kind, weights))
    assert torch.equal(merged, _output(kind, _plain(kind, saved_model)))
    torch.testing.assert_close(merged, done["outputs"][name], rtol=0, atol=1e-6)  # TP's own forward


def test_merge_on_one_rank_of_the_live_job_and_from_the_cli(done, tmp_path):
    """`if rank == 0: merge_weights(...)` in a TP job, and `fsdp-nb merge-weights`: the same full weights."""
    saved_model = done["saved"]["gpt-tp"][0]["model"]
    live = _safetensors(done["live_merged"])  # written by rank 0 alone, inside the 4-rank job
    assert cli.main(["merge-weights", str(done["root"] / "gpt-tp"), str(tmp_path)]) == 0
    from_cli = _safetensors(str(tmp_path / "model.safetensors"))
    for weights in (live, from_cli):
        assert sorted(weights) == sorted(saved_model)
        assert all(torch.equal(weights[k], v) for k, v in saved_model.items())


def _safetensors(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def test_a_full_save_under_tp_logs_none_of_dtensors_notices(done):
    """Gathering (dp_shard, tp) DTensors makes DTensor log, once per mesh and process and on every rank,
    that it takes two all-gathers: four lines of torch internals under a FULL_STATE_DICT save, unless hidden."""
    logged = done["logged"]
    assert any("all_reduce" in line for line in logged)  # the handler hears DTensor's logger outside quiet()
    assert not any("all_gather" in line for line in logged), logged  # neither the save's nor the one in quiet()
