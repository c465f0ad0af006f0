"""The layout model's bytes per rank against the bytes live ranks hold, on 4-rank HSDP (2 replicas × 2 shards).

`fsdp1_layout` / `fsdp2_layout` predict, from shapes alone, how many bytes of parameter
storage each rank keeps (real data and padding); `session.memory` reads what the ranks
really hold (`memory_of`: each storage once, whole, so padding counts). On a hybrid mesh
the two must agree for every rank, replicas included: FSDP2 with dp_replicate=2, and
FSDP1 HYBRID_SHARD with dp_replicate_size=2 (use_orig_params off and on, which pads
differently), for the GPT debug config and the Layer (93 elements, uneven rows).

FSDP1 makes one FlatParameter per wrapped unit, and the model describes one, so the
prediction is summed over the units: each Block of the GPT, then the root with what is
left (TRANSFORMER_BASED_WRAP); the Layer is one unit. The ranks are measured after an
optimizer step, between steps, where `memory_of` is meant to be read.
"""

from __future__ import annotations

import textwrap

import pytest

from fsdp_nb.layout import fsdp1_layout, fsdp2_layout, specs_of
from fsdp_nb.models import GPT, GPTConfig, Layer
from fsdp_nb.session.output import Silent

UNITS = {"layer": ("",), "gpt": ("blocks.0", "blocks.1", "")}  # the modules wrapped; "" the root, last
CASES = [
    (kind, fsdp)
    for kind in ("layer", "gpt")
    for fsdp in ("hsdp2", "hybrid1 use_orig_params=False", "hybrid1 use_orig_params=True")
]

SETUP = """
import warnings, torch
from fsdp_nb import FSDPConfig, shard
from fsdp_nb.models import GPT, GPTConfig, Layer

def built(kind, fsdp):
    wrap = "TRANSFORMER_BASED_WRAP" if kind == "gpt" else "NO_WRAP"
    if fsdp == "hsdp2":
        config = FSDPConfig(fsdp_version=2, dp_replicate_size=2, auto_wrap_policy=wrap)
    else:
        uop = fsdp.endswith("True")
        with warnings.catch_warnings():  # HYBRID_SHARD's FutureWarning
            warnings.simplefilter("ignore")
            config = FSDPConfig(fsdp_version=1, sharding_strategy="HYBRID_SHARD", dp_replicate_size=2,
                                use_orig_params=uop, auto_wrap_policy=wrap)
    torch.manual_seed(0)
    model = shard(GPT(GPTConfig.debug(), seed=0) if kind == "gpt" else Layer(), config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (2, 16)) if kind == "gpt" else torch.randn(2, 4)
    (model(x, x)[1] if kind == "gpt" else model(x).sum()).backward()
    opt.step()
    opt.zero_grad()
    return model
"""


@pytest.fixture(scope="module")
def measured(session4):
    """`session.memory` of every case, read on the shared 4-rank session: {(kind, fsdp): [MemoryReport per rank]}."""
    from conftest import ready

    session = ready(session4)
    session.run(textwrap.dedent(SETUP), output=Silent()).raise_errors()
    found = {}
    for i, case in enumerate(CASES):
        session.run(f"memory_case_{i} = built(*{case!r})", output=Silent()).raise_errors()
        found[case] = session.memory(f"memory_case_{i}")
    return found


def _unit_specs(kind: str) -> list[tuple]:
    """Each wrapped unit's parameters, in `named_parameters` order; a parameter belongs to the first
    unit whose name prefixes it, the root ("") to what no Block holds."""
    specs = specs_of(GPT(GPTConfig.debug(), seed=0) if kind == "gpt" else Layer())
    owner = {s.name: next(u for u in UNITS[kind] if not u or s.name.startswith(u + ".")) for s in specs}
    return [tuple(s for s in specs if owner[s.name] == unit) for unit in UNITS[kind]]


def predicted(kind: str, fsdp: str) -> list[tuple[int, int]]:
    """(real, padding) bytes of parameter storage per rank, from the layout model alone."""
    if fsdp == "hsdp2":
        specs = specs_of(GPT(GPTConfig.debug(), seed=0) if kind == "gpt" else Layer())
        layout = fsdp2_layout(specs, 4, groups=UNITS[kind], dp_replicate=2)
        return [(b.real, b.padding) for b in layout.bytes_per_rank]
    uop = fsdp.endswith("True")
    layouts = [fsdp1_layout(unit, 4, uop, dp_replicate=2) for unit in _unit_specs(kind)]
    return [tuple(sum(getattr(lay.bytes(r), f) for lay in layouts) for f in ("real", "padding")) for r in range(4)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind, fsdp", CASES)
def test_session_memory_is_the_layout_models_bytes_per_rank(measured, kind, fsdp):
    reports = measured[(kind, fsdp)]
    assert [r.rank for r in reports] == [0, 1, 2, 3] and all(r.world_size == 4 for r in reports)
    live = [(r.params.real, r.params.padding) for r in reports]
    assert live == predicted(kind, fsdp)
    assert live[:2] == live[2:]  # replica row 1 holds what row 0 holds, rank r·2 + s shard s


def test_the_prediction_sees_padding_where_torch_pads():
    """So the comparison above is not of zeros: the Layer's uneven rows and flat chunks are padded."""
    assert predicted("layer", "hsdp2") == [(200, 0), (172, 28), (200, 0), (172, 28)]  # l3: 3 rows over 2
    assert predicted("layer", "hybrid1 use_orig_params=False") == [(188, 0), (184, 4)] * 2  # 93 -> 94 elements
    total = sum(p.numel for p in specs_of(GPT(GPTConfig.debug()))) * 4
    assert sum(real for real, _ in predicted("gpt", "hsdp2")) == 2 * total  # each element on one rank per replica
