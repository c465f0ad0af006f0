"""HSDP checkpoints: a 2×2 save loads at other world sizes and FSDP versions, and the reverse, exact.

The saves and loads run once, in the module fixture `done`, in an order that lets every
checkpoint exist before it is read: FSDP1 at 2 ranks (the shared session) and FSDP2 at 3
save first; ONE 4-rank session loads both into HSDP 2×2 (FSDP2), saves its own, and
round-trips FSDP1 HYBRID_SHARD 2×2 in both state dict types; once it is closed, the 3-rank
and 2-rank sessions load the HSDP checkpoint. (The 3-rank session waits, idle in a blocking
read, while the 4 ranks work.) The tests then compare what each load gathered against what
the saver gathered, key by key with torch.equal, AdamW state included, and the losses of
training on from the loaded state against the saver's own continuation.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from test_checkpoint import HELPERS, assert_same_state
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from fsdp_nb import Session
from fsdp_nb.checkpoint import merge_weights
from fsdp_nb.models import GPT, GPTConfig
from fsdp_nb.session.output import Silent

STEPS, MORE = 3, 2  # steps before the save; steps on from it, by the saver and by every loader
HSDP2 = dict(fsdp_version=2, dp_replicate_size=2)
HYBRID1 = dict(fsdp_version=1, sharding_strategy="HYBRID_SHARD", dp_replicate_size=2)

# A global batch of 12 rows, whatever the world size (12 = 2·6 = 3·4 = 4·3): rank r takes its slice,
# so runs at 2, 3 and 4 ranks take the same steps on the same data (HELPERS' batch grows with the world).
SETUP = (
    HELPERS
    + """
import warnings
from fsdp_nb import FSDPConfig
from fsdp_nb.checkpoint import merge_weights
warnings.filterwarnings("ignore")

def batch(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, 256, (12, 16), generator=g)  # (B, T), the same on every rank
    n = 12 // world_size
    return x[n * rank : n * (rank + 1)]  # rows [n·r, n·(r+1)) on rank r

def build_with(seed=1, **fsdp):
    fsdp = {"auto_wrap_policy": "TRANSFORMER_BASED_WRAP", **fsdp}
    with warnings.catch_warnings():  # HYBRID_SHARD's FutureWarning
        warnings.simplefilter("ignore")
        config = FSDPConfig(**fsdp)
    model = shard(GPT(GPTConfig.debug(), seed=seed), config)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

saved, loaded = {}, {}

def save_as(name, kind="SHARDED_STATE_DICT", async_save=False, **fsdp):
    model, opt = build_with(**fsdp)
    train(model, opt, STEPS)
    state = full(model, opt)
    handle = save_checkpoint(model, opt, f"{root}/{name}", state_dict_type=kind, async_save=async_save)
    more = train(model, opt, MORE, start=STEPS)  # with async_save, while the copy of the shards is written
    if handle is not None:
        handle.wait()
    saved[name] = state, more

def load_as(case, name, **fsdp):
    model, opt = build_with(seed=7, **fsdp)  # other weights: everything must come from the file
    load_checkpoint(model, opt, f"{root}/{name}")
    state = full(model, opt)
    loaded[case] = name, state, train(model, opt, MORE, start=STEPS)
"""
)


def run(session, *cells: str) -> None:
    for cell in cells:
        session.run(textwrap.dedent(cell), output=Silent()).raise_errors()


@pytest.fixture(scope="module")
def done(_shared_session, session4, tmp_path_factory):
    """Every save and load, run once: `saved` {checkpoint: (state, losses on from it)}, `loaded` {case:
    (checkpoint, state, losses on from it)}, the checkpoints' `root`, and FSDP1 hybrid's sharded value types."""
    from conftest import ready

    root = tmp_path_factory.mktemp("hsdp-checkpoints")
    two = ready(_shared_session)
    saved, loaded = {}, {}

    def collect(session):
        saved.update(session.eval("saved")[0])
        loaded.update(session.eval("loaded")[0])

    cells = (SETUP, f"root, STEPS, MORE = {str(root)!r}, {STEPS}, {MORE}")
    run(two, *cells, "save_as('fsdp1-w2', fsdp_version=1, use_orig_params=False)")
    three = Session(3, timeout=60)
    try:
        run(three, *cells, "save_as('fsdp2-w3', fsdp_version=2)")
        four = ready(session4)  # the shared one: left open for the other 4-rank modules
        run(
            four,
            *cells,
            f"""
            save_as('hsdp2', **{HSDP2!r})
            load_as('fsdp1-w2 -> hsdp2', 'fsdp1-w2', **{HSDP2!r})
            load_as('fsdp2-w3 -> hsdp2', 'fsdp2-w3', **{HSDP2!r})
            save_as('hsdp2-async', async_save=True, **{HSDP2!r})
            load_as('hsdp2-async -> hsdp2', 'hsdp2-async', **{HSDP2!r})
            for kind in ("SHARDED_STATE_DICT", "FULL_STATE_DICT"):
                save_as(f'hybrid1-{{kind}}', kind, **{HYBRID1!r})
                load_as(f'hybrid1-{{kind}} -> hybrid1', f'hybrid1-{{kind}}', **{HYBRID1!r})
            load_as('hybrid1-SHARDED_STATE_DICT -> hsdp2', 'hybrid1-SHARDED_STATE_DICT', **{HSDP2!r})
            load_as('hsdp2 -> hybrid1', 'hsdp2', **{HYBRID1!r})
            model, _ = build_with(**{HYBRID1!r})
            hybrid1_sharded_types = sorted({{type(v).__name__ for v in get_model_state_dict(model).values()}})
            """,
        )
        collect(four)
        hybrid1_types = four.eval("hybrid1_sharded_types")[0]
        run(three, "load_as('hsdp2 -> fsdp2-w3', 'hsdp2', fsdp_version=2)")
        collect(three)
    finally:
        three.close()
    run(two, "load_as('hsdp2 -> fsdp1-w2', 'hsdp2', fsdp_version=1, use_orig_params=False)")
    collect(two)
    return dict(root=root, saved=saved, loaded=loaded, hybrid1_types=hybrid1_types)


def check(done, case: str, same_world: bool) -> None:
    """The load holds exactly what was saved, and training goes on as the saver's own run went on."""
    name, state, losses = done["loaded"][case]
    saved_state, saved_losses = done["saved"][name]
    some = next(iter(saved_state["optim"].values()))
    assert not torch.equal(some["exp_avg"], some["exp_avg_sq"])  # else a swap of the two could not be seen
    assert_same_state(state, saved_state)
    if same_world:  # the same ranks, the same reductions: the same bits
        assert losses == saved_losses, case
    else:  # other world sizes sum the per-rank means in another order: float rounding only
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(saved_losses), rtol=1e-6, atol=1e-6, msg=case)


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "case", ["hsdp2 -> fsdp2-w3", "hsdp2 -> fsdp1-w2", "fsdp1-w2 -> hsdp2", "fsdp2-w3 -> hsdp2"]
)  # fmt: skip
def test_hsdp_checkpoint_loads_across_versions_and_world_sizes_exactly(done, case):
    check(done, case, same_world=False)


@pytest.mark.parametrize("kind", ["SHARDED_STATE_DICT", "FULL_STATE_DICT"])
def test_fsdp1_hybrid_shard_round_trips_both_state_dict_types(done, kind):
    check(done, f"hybrid1-{kind} -> hybrid1", same_world=True)


@pytest.mark.parametrize("case", ["hybrid1-SHARDED_STATE_DICT -> hsdp2", "hsdp2 -> hybrid1", "hsdp2-async -> hsdp2"])
def test_hybrid_checkpoints_of_either_version_load_at_2x2(done, case):
    check(done, case, same_world=True)


def test_fsdp1_hybrid_sharded_state_is_dtensors_on_its_2d_mesh(done):
    assert done["hybrid1_types"] == ["DTensor"]  # given device_mesh=, FSDP1 leaves ShardedTensor behind


@pytest.mark.parametrize("name", ["hsdp2", "hsdp2-async", "hybrid1-SHARDED_STATE_DICT"])
def test_replicas_write_each_shard_once(done, name):
    """DCP dedupes the replicas' identical shards: the chunks stored cover each tensor exactly once."""
    path = done["root"] / name
    metadata = FileSystemReader(str(path)).read_metadata()
    tensors = {k: m for k, m in metadata.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    for key, m in tensors.items():
        stored = sum(c.sizes.numel() for c in m.chunks)
        assert stored == m.size.numel(), key  # 2× were both replicas to write
        assert len({tuple(c.offsets) for c in m.chunks}) == len(m.chunks), key
    written = {}
    for info in metadata.storage_data.values():
        written[info.relative_path] = written.get(info.relative_path, 0) + info.length
    files = {p.name: p.stat().st_size for p in path.glob("*.distcp")}
    assert written == files  # every byte of the shard files is an item the metadata indexes
    assert len(files) == 4  # each rank wrote a file: the replicated shards are spread, not all on one rank
    assert all(size > 0 for size in files.values())


def test_merge_of_an_hsdp_checkpoint_is_the_plain_models_weights(done, tmp_path):
    saved_model = done["saved"]["hsdp2"][0]["model"]
    written = merge_weights(done["root"] / "hsdp2", tmp_path / "merged", safe_serialization=False)
    weights = torch.load(written, weights_only=True)
    assert sorted(weights) == sorted(saved_model)
    for key, value in saved_model.items():
        assert torch.equal(weights[key], value), key
    plain = GPT(GPTConfig.debug(), seed=123)
    plain.load_state_dict(weights, strict=True)  # the plain model's own names and shapes
