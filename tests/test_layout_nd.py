"""N-D layouts: FSDP and HSDP over every (R, S) mesh of at most 8 ranks, modelled and read, against torch.

Every parameter is filled with its own flat indices before sharding, so a rank's
local values *are* the indices it stores: `elements(name, rank)` must equal them.
torch's fake process group makes this process rank r of W (collectives move no data;
sharding local data needs none), so no process is spawned.
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
from torch.testing._internal.distributed.fake_pg import FakeStore

from fsdp_nb.inspect import layout_of, memory_of
from fsdp_nb.layout import fsdp1_layout, fsdp2_layout, specs_of
from fsdp_nb.models import GPT, GPTConfig, Layer
from fsdp_nb.parallelism import MESH_DIM_NAMES

CPU = torch.device("cpu")

MESHES = [(W, R) for W in range(1, 9) for R in range(1, W + 1) if W % R == 0]  # 20 (R, S) shapes, 103 ranks


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


@torch.no_grad()
def indexed(module: nn.Module) -> nn.Module:
    """Every parameter holds its own flat indices (exact in fp32 below 2**24)."""
    for p in module.parameters():
        p.copy_(torch.arange(p.numel()).view(p.shape))
    return module


def mesh_for(W: int, R: int):
    """1-D (S,) for R = 1, else the (R, S) mesh fsdp_nb builds: rank = r·S + s."""
    if R == 1:
        return init_device_mesh("cpu", (W,))
    return init_device_mesh("cpu", (R, W // R), mesh_dim_names=MESH_DIM_NAMES)


def check_fsdp2(module: nn.Module, rank: int, W: int, R: int, mesh) -> int:
    specs = specs_of(indexed(module))  # indices are written before anything is sharded
    groups = tuple(n for n, m in module.named_modules() if n and isinstance(m, nn.Linear))[:2] + ("",)
    for g in groups[:-1]:
        fully_shard(module.get_submodule(g), mesh=mesh)
    fully_shard(module, mesh=mesh)
    model = fsdp2_layout(specs, W, groups=groups, dp_replicate=R)
    for name, p in module.named_parameters():
        assert tuple(map(repr, p.placements)) == model.placements(name), (name, rank, W, R)
        assert torch.equal(p.to_local().flatten().long(), model.elements(name, rank)), (name, rank, W, R)
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
    with pytest.raises(NotImplementedError, match="tensor-parallel"):
        fsdp2_layout(specs, 4, tp=2)
    with pytest.raises(KeyError, match="unknown parameter"):
        flat.elements("l9.weight", 0)
