"""N-D layouts: FSDP, HSDP and FSDP2 + TP over every (R, S) and (R, S, 2) mesh of at most 8 ranks, against torch.

Every parameter is filled with its own flat indices before sharding, so a rank's
local values *are* the indices it stores: `elements(name, rank)` must equal them.
torch's fake process group makes this process rank r of W (collectives move no data;
sharding local data needs none), so no process is spawned. Tensor parallelism is applied
with `src_data_rank=None` (each rank cuts its own full copy, as rank 0's scatter would);
tests/test_tp.py reads the same layouts on real gloo ranks, through fsdp_nb's own `shard`.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy, fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.testing._internal.distributed.fake_pg import FakeStore

from fsdp_nb.inspect import layout_of, memory_of
from fsdp_nb.layout import fsdp1_layout, fsdp2_layout, specs_of
from fsdp_nb.models import GPT, GPTConfig, Layer
from fsdp_nb.parallelism import MESH_DIM_NAMES

CPU = torch.device("cpu")

MESHES = [(W, R) for W in range(1, 9) for R in range(1, W + 1) if W % R == 0]  # 20 (R, S) shapes, 103 ranks
TP_MESHES = [(W, R) for W in range(2, 9, 2) for R in range(1, W // 2 + 1) if W // 2 % R == 0]  # 8 (R, S, 2) shapes


@contextlib.contextmanager
def fake_pg(rank: int, world_size: int):
    """Be rank `rank` of `world_size` in this process, then leave no process group behind."""
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def linear_stack(seed: int) -> nn.Sequential:
    """1..4 Linear layers of random widths 1..13, some without bias: ragged rows, empty shards."""
    g = torch.Generator().manual_seed(seed)
    widths = torch.randint(1, 14, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
    bias = torch.randint(0, 2, (len(widths),), generator=g).tolist()
    return nn.Sequential(*(nn.Linear(a, b, bias=bool(c)) for a, b, c in zip(widths, widths[1:], bias)))


def models(W: int, R: int) -> dict[str, nn.Module]:
    return {"layer": Layer(), "gpt": GPT(GPTConfig.debug()), "linears": linear_stack(10 * W + R)}


def plan_for(module: nn.Module, T: int) -> dict[str, str]:
    """The model's own plan, or for a Linear stack: colwise / rowwise in turn, wherever the cut dim splits evenly."""
    if hasattr(module, "base_model_tp_plan"):
        return dict(module.base_model_tp_plan)
    plan = {}
    for i, m in enumerate(module):
        sizes = {"colwise": m.out_features, "rowwise": m.in_features}
        for style in ("colwise", "rowwise")[i % 2 :] + ("colwise", "rowwise")[: i % 2]:
            if sizes[style] % T == 0:
                plan[str(i)] = style
                break
    return plan


def apply_tp(module: nn.Module, plan: dict[str, str], mesh) -> None:
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for pattern, style in plan.items():
        regex = pattern.replace(".", r"\.").replace("*", "[^.]+")
        for name, m in module.named_modules():
            if name and __import__("re").fullmatch(regex, name):
                parallelize_module(m, mesh["tp"], styles[style](), src_data_rank=None)


@torch.no_grad()
def indexed(module: nn.Module) -> nn.Module:
    """Every parameter holds its own flat indices (exact in fp32 below 2**24)."""
    for p in module.parameters():
        p.copy_(torch.arange(p.numel()).view(p.shape))
    return module


def mesh_for(W: int, R: int, T: int = 1):
    """1-D (S,) for R = T = 1, else the mesh fsdp_nb builds: (R, S), (S, T) or (R, S, T), row-major."""
    if R == 1 and T == 1:
        return init_device_mesh("cpu", (W,))
    shape, names = (R, W // (R * T), T), MESH_DIM_NAMES + ("tp",)
    keep = [i for i, n in enumerate(shape) if n > 1 or i == 1]  # dp_shard stays, even of size 1
    return init_device_mesh("cpu", tuple(shape[i] for i in keep), mesh_dim_names=tuple(names[i] for i in keep))


def dp_mesh(mesh):
    names = mesh.mesh_dim_names or ()
    dp = tuple(n for n in names if n != "tp")
    return mesh[dp if len(dp) > 1 else dp[0]] if "tp" in names else mesh


def check_fsdp2(module: nn.Module, rank: int, W: int, R: int, mesh, T: int = 1) -> int:
    specs = specs_of(indexed(module))  # indices are written before anything is sharded
    plan = plan_for(module, T) if T > 1 else None
    if plan:
        apply_tp(module, plan, mesh)  # TP first, then FSDP over the data-parallel dims
    groups = tuple(n for n, m in module.named_modules() if n and isinstance(m, nn.Linear))[:2] + ("",)
    for g in groups[:-1]:
        fully_shard(module.get_submodule(g), mesh=dp_mesh(mesh))
    fully_shard(module, mesh=dp_mesh(mesh))
    model = fsdp2_layout(specs, W, groups=groups, dp_replicate=R, tp=T, tp_plan=plan)
    where = (rank, W, R, T)
    for name, p in module.named_parameters():
        assert tuple(map(repr, p.placements)) == model.placements(name), (name, *where)
        assert tuple(p.to_local().shape) == model.local_shape(name, rank), (name, *where)
        assert torch.equal(p.to_local().flatten().long(), model.elements(name, rank)), (name, *where)
    assert layout_of(module) == replace(model, observed_ranks=(rank,))
    assert memory_of(module).params == model.bytes(rank)
    return len(specs)


def check_fsdp1(module: nn.Module, rank: int, W: int, R: int, mesh, uop: bool) -> int:
    specs = specs_of(module)
    hybrid = {"device_mesh": mesh, "sharding_strategy": ShardingStrategy.HYBRID_SHARD} if R > 1 else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "FSDP is switching to use `NO_SHARD`")  # S = 1: torch shards nothing
        fsdp = FSDP(indexed(module), device_id=CPU, use_orig_params=uop, **hybrid)
    model = fsdp1_layout(specs, W, use_orig_params=uop, dp_replicate=R)
    flat, offset, got = fsdp._handle.flat_param, 0, {s.name: [] for s in specs}
    for seg in model.segments(rank):  # the local chunk, read through the modelled segments
        if seg.name is not None:
            got[seg.name].append(flat[offset : offset + seg.numel].long())
        offset += seg.numel
    assert offset == flat.numel()
    for spec in specs:
        want = model.elements(spec.name, rank)
        assert torch.equal(torch.cat(got[spec.name]) if got[spec.name] else want[:0], want), (spec.name, rank, W, R)
        assert model.placements(spec.name) == (("Replicate()",) if R > 1 else ()) + ("Shard(dim=0)",)
    if W // R > 1 or R == 1:  # with S = 1 torch turns HYBRID_SHARD into NO_SHARD, read as one rank
        assert layout_of(fsdp) == replace(model, observed_ranks=(rank,))
        assert memory_of(fsdp).params == model.bytes(rank)
    return len(specs)


@pytest.mark.parametrize("W", range(1, 9))
def test_nd_layouts_match_torch_values_on_every_rank(W):
    checked = 0
    for R in (R for w, R in MESHES if w == W):
        for rank in range(W):
            with fake_pg(rank, W):
                mesh = mesh_for(W, R)
                for module in models(W, R).values():
                    checked += check_fsdp2(module, rank, W, R, mesh)
                for k, module in enumerate(models(W, R).values()):
                    checked += check_fsdp1(module, rank, W, R, mesh, uop=bool((k + rank) % 2))
    for R in (R for w, R in TP_MESHES if w == W):  # FSDP2 + TP: (R, S, 2)
        for rank in range(W):
            with fake_pg(rank, W):
                mesh = mesh_for(W, R, 2)
                for module in models(W, R).values():
                    if plan_for(module, 2):  # a stack of odd widths has nothing TP can cut
                        checked += check_fsdp2(module, rank, W, R, mesh, T=2)
    assert checked > 0


# ------------------------------------------------------------ the model alone ----
def test_replicas_hold_what_their_shard_peer_holds():
    specs = specs_of(Layer(5, 7, 2))
    for lay in (fsdp2_layout(specs, 6, dp_replicate=2), fsdp1_layout(specs, 6, use_orig_params=True, dp_replicate=2)):
        assert lay.shard_size == 3
        assert lay.bytes_per_rank[:3] == lay.bytes_per_rank[3:]  # rank r·3 + s holds shard s
        for spec in specs:
            rows = [lay.elements(spec.name, s) for s in range(3)]
            assert torch.equal(torch.cat(rows), torch.arange(spec.numel))  # one row partitions the parameter
            assert all(torch.equal(lay.elements(spec.name, 3 + s), rows[s]) for s in range(3))
        assert lay.placements("l1.weight") == ("Replicate()", "Shard(dim=0)")
    assert fsdp2_layout(specs, 6, dp_replicate=2).padded_dim0("l1.weight") == 9  # 3 rows × 3 shard ranks


def test_one_d_is_unchanged_and_bad_meshes_are_refused():
    specs = specs_of(Layer())
    flat = fsdp1_layout(specs, 4)
    assert flat.dp_replicate == 1 and flat.placements("l2.bias") == ("Shard(dim=0)",)
    assert torch.equal(fsdp2_layout(specs, 2).elements("l1.weight", 1), torch.arange(12, 24))  # rows 3..5 of (6, 4)
    assert torch.equal(flat.elements("l3.bias", 3), torch.arange(0, 3))  # the last chunk ends with l3.bias
    with pytest.raises(ValueError, match=r"dp_replicate=4 must divide world_size=6; accepted: \[1, 2, 3, 6\]"):
        fsdp2_layout(specs, 6, dp_replicate=4)
    with pytest.raises(ValueError, match="dp_replicate=0"):
        fsdp1_layout(specs, 6, dp_replicate=0)
    with pytest.raises(KeyError, match="unknown parameter"):
        flat.elements("l9.weight", 0)


def test_tp_worked_example_strided_rows_and_rowwise_columns():
    """The example of [Note: TP layouts]: Layer's l1 (6 × 4) colwise, l2 (6 × 6) rowwise, on (S=2, T=2)."""
    lay = fsdp2_layout(specs_of(Layer()), 4, tp=2, tp_plan=Layer.base_model_tp_plan)
    assert lay.shard_size == 2 and lay.tp == 2
    assert [lay.rows("l1.weight", r) for r in range(4)] == [(0, 2), (3, 5), (2, 3), (5, 6)]  # rank = s·2 + t
    assert lay.placements("l1.weight") == ("_StridedShard(dim=0, sf=2)", "Shard(dim=0)")
    assert lay.placements("l2.weight") == ("Shard(dim=0)", "Shard(dim=1)")
    assert lay.placements("l2.bias") == ("Shard(dim=0)", "Replicate()")
    assert lay.placements("l3.weight") == ("Shard(dim=0)",)  # off the plan: the data-parallel mesh alone
    assert lay.local_shape("l2.weight", 1) == (3, 3)
    assert lay.elements("l2.weight", 1).tolist() == [3, 4, 5, 9, 10, 11, 15, 16, 17]  # rows 0-2 × columns 3-5
    assert torch.equal(lay.elements("l3.weight", 0), lay.elements("l3.weight", 1))  # TP peers share it
    # s=1 keeps 1 of 2 padded rows of l1 (3 TP rows over 2) and of l3 (3 rows over 2): one row of each, padding
    assert lay.padded_rows[0] == 2 and lay.bytes(2).padding == (4 + 1 + 6 + 1) * 4
    hsdp = fsdp2_layout(specs_of(Layer()), 8, dp_replicate=2, tp=2, tp_plan=Layer.base_model_tp_plan)
    assert hsdp.placements("l1.bias") == ("Replicate()", "_StridedShard(dim=0, sf=2)", "Shard(dim=0)")
    assert hsdp.bytes_per_rank[:4] == hsdp.bytes_per_rank[4:]  # the second replica holds the same bytes


def test_tp_plans_are_checked_in_one_line():
    specs = specs_of(Layer())
    cases = {
        "tp=2 needs tp_plan=": dict(tp=2),
        "tp_plan= needs tp > 1": dict(tp_plan={"l1": "colwise"}),
        "'diagonal' is not a plan word": dict(tp=2, tp_plan={"l1": "diagonal"}),
        "matches no module": dict(tp=2, tp_plan={"l9": "colwise"}),
        "does not split evenly; use a tp that divides 6": dict(tp=4, tp_plan={"l1": "colwise"}),
        r"dp_replicate=3 × tp=2 must divide world_size=8; accepted: \[1, 2, 4\]": dict(dp_replicate=3, tp=2),
    }
    for message, kwargs in cases.items():
        with pytest.raises(ValueError, match=message) as e:
            fsdp2_layout(specs, 8, **kwargs)
        assert "\n" not in str(e.value)
