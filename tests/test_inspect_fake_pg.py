"""The pure layouts against what torch really builds, for every rank of world sizes 1..8.

torch's fake process group lets one process be rank r of a group of w (collectives
move no data), so real FSDP1 / FSDP2 modules are built here without spawning.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import MixedPrecision, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.distributed.tensor import Shard
from torch.testing._internal.distributed.fake_pg import FakeStore

from fsdp_nb.layout import fsdp1_layout, fsdp2_layout, specs_of
from fsdp_nb.layout.inspect import fsdp1_layouts_of, layout_of, merge_observed, specs_of_sharded
from fsdp_nb.layout.memory import memory_of
from fsdp_nb.models import Layer

CPU = torch.device("cpu")
MODELS = {
    "default": lambda: Layer(),  # 93 elements, l3 has 3 rows
    "uneven": lambda: Layer(5, 7, 2),  # 7-row layers, 2-row l3: empty shards from 3 ranks on
    "bf16": lambda: Layer().to(torch.bfloat16),  # FSDP1 aligns to 8 elements
}


@contextlib.contextmanager
def fake_pg(rank: int, world_size: int):
    """Be rank `rank` of `world_size` in this process, then leave no process group behind."""
    assert not dist.is_initialized(), "a process group leaked from an earlier test"
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build(name: str):
    torch.manual_seed(0)
    module = MODELS[name]()
    return module, {n: p.detach().clone() for n, p in module.named_parameters()}, specs_of(module)


def check_fsdp1(name: str, rank: int, world: int, **kwargs) -> None:
    module, full, specs = build(name)
    fsdp = FSDP(module, device_id=CPU, **kwargs)
    uop = kwargs.get("use_orig_params", False)
    mp = kwargs.get("mixed_precision")
    model = fsdp1_layout(specs, world, use_orig_params=uop, param_dtype=mp.param_dtype if mp else None)
    flat = fsdp._handle.flat_param
    assert list(flat._fqns) == [s.name for s in specs]
    assert list(flat._numels_with_padding) == [seg.numel for seg in model.flat]
    assert list(flat._is_padding_mask) == [seg.name is None for seg in model.flat]
    assert flat.numel() == model.chunk_numel
    where, offset = {}, 0
    for seg in model.segments(rank):
        if seg.name is not None:
            where[seg.name] = (offset, seg)
        offset += seg.numel
    for fqn, info in zip(flat._fqns, flat._shard_param_infos):
        if fqn not in where:
            assert not info.in_shard, f"{name} rank {rank}/{world}: {fqn} unexpectedly on this rank"
            continue
        off, seg = where[fqn]
        assert (
            info.in_shard,
            info.offset_in_shard,
            info.numel_in_shard,
            info.intra_param_start_idx,
            info.intra_param_end_idx,
        ) == (True, off, seg.numel, seg.start, seg.stop - 1), (name, rank, world, fqn)
        # and the local chunk really holds those elements of the parameter
        assert torch.equal(flat[off : off + seg.numel], full[fqn].flatten()[seg.start : seg.stop])
    last = model.segments(rank)[-1]
    assert flat._shard_numel_padded == (last.numel if last.name is None and not uop else 0)
    assert layout_of(fsdp) == replace(model, observed_ranks=(rank,))
    assert memory_of(fsdp).params == model.bytes(rank)


def check_fsdp2(name: str, rank: int, world: int, mesh, per_layer: bool) -> None:
    module, full, specs = build(name)
    groups = ("l1", "l2", "l3", "") if per_layer else ("",)
    for layer in groups[:-1]:
        fully_shard(getattr(module, layer), mesh=mesh)
    fully_shard(module, mesh=mesh)
    model = fsdp2_layout(specs, world, groups=groups)
    for fqn, p in module.named_parameters():
        assert p.placements == (Shard(0),)
        local = p.to_local()
        assert tuple(local.shape) == model.local_shape(fqn, rank), (name, rank, world, fqn)
        start, stop = model.rows(fqn, rank)
        assert torch.equal(local, full[fqn][start:stop])
        # the local tensor is a view into storage padded to ceil(rows / world) rows
        assert local.untyped_storage().nbytes() == math.prod(model.padded_local_shape(fqn)) * p.element_size()
    assert layout_of(module) == replace(model, observed_ranks=(rank,))
    assert memory_of(module).params == model.bytes(rank)


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")  # world size 1
@pytest.mark.parametrize("world", range(1, 9))
def test_layouts_match_torch_on_every_rank(world):
    for rank in range(world):
        with fake_pg(rank, world):
            for name in MODELS:
                check_fsdp1(name, rank, world)
                check_fsdp1(name, rank, world, use_orig_params=True)
            check_fsdp1(
                "default", rank, world, use_orig_params=True, mixed_precision=MixedPrecision(param_dtype=torch.bfloat16)
            )  # aligns to 8 bf16 elements
            mesh = init_device_mesh("cpu", (world,))
            for k, name in enumerate(MODELS):
                check_fsdp2(name, rank, world, mesh, per_layer=bool((k + rank) % 2))


def test_merging_every_rank_gives_the_whole_truth():
    seen1, seen2 = [], []
    for rank in range(3):
        with fake_pg(rank, 3):
            seen1.append(layout_of(FSDP(Layer(5, 7, 2), device_id=CPU, use_orig_params=True)))
            module = Layer(5, 7, 2)
            fully_shard(module, mesh=init_device_mesh("cpu", (3,)))
            seen2.append(layout_of(module))
    specs = specs_of(Layer(5, 7, 2))
    assert merge_observed(seen1) == replace(fsdp1_layout(specs, 3, use_orig_params=True), observed_ranks=(0, 1, 2))
    assert merge_observed(seen2) == replace(fsdp2_layout(specs, 3), observed_ranks=(0, 1, 2))


def test_specs_are_recovered_from_sharded_modules():
    want = specs_of(Layer())
    with fake_pg(1, 2):
        for uop in (False, True):
            assert specs_of_sharded(FSDP(Layer(), device_id=CPU, use_orig_params=uop)) == want
        nested = Layer()
        nested.l2 = FSDP(nested.l2, device_id=CPU)
        nested = FSDP(nested, device_id=CPU)
        assert specs_of_sharded(nested) == want  # l2's FlatParameter comes second but l2 is put back in place
        layouts = fsdp1_layouts_of(nested)
        assert sorted(layouts) == ["", "l2"]
        assert layouts["l2"] == replace(fsdp1_layout(want[2:4], 2), observed_ranks=(1,))
        assert layouts[""] == replace(fsdp1_layout(want[:2] + want[4:], 2), observed_ranks=(1,))
        with pytest.raises(ValueError, match=r"2 FlatParameters .*fsdp1_layouts_of"):
            layout_of(nested)
        frozen = Layer()
        frozen.l1.requires_grad_(False)
        got = specs_of_sharded(FSDP(frozen, device_id=CPU, use_orig_params=True))
        assert [s.requires_grad for s in got] == [False, False, True, True, True, True]
        module = Layer()
        fully_shard(module, mesh=init_device_mesh("cpu", (2,)))
        assert specs_of_sharded(module) == want
    with pytest.raises(TypeError, match="not sharded"):
        layout_of(Layer())


def test_memory_after_an_adam_step():
    with fake_pg(1, 2):
        fsdp = FSDP(Layer(), device_id=CPU)
        opt = torch.optim.Adam(fsdp.parameters())
        fsdp(torch.randn(2, 4)).sum().backward()
        opt.step()
        mem = memory_of(fsdp, opt)
        # rank 1 holds 46 real elements + 1 padding of the FlatParameter, its gradient and both Adam moments
        assert (mem.params.real, mem.params.padding) == (46 * 4, 4)
        assert (mem.grads.real, mem.grads.padding) == (46 * 4, 4)
        assert (mem.optimizer.real, mem.optimizer.padding) == (2 * 46 * 4 + 4, 2 * 4)  # + the step scalar
        module = Layer()
        fully_shard(module, mesh=init_device_mesh("cpu", (2,)))
        opt = torch.optim.Adam(module.parameters())
        module(torch.randn(2, 4)).sum().backward()
        opt.step()
        mem = memory_of(module, opt)
        assert (mem.params.real, mem.params.padding) == (43 * 4, 7 * 4)
        assert (mem.grads.real, mem.grads.padding) == (43 * 4, 7 * 4)  # one padded reduce-scatter output
        assert (mem.optimizer.real, mem.optimizer.padding) == (2 * 43 * 4 + 6 * 4, 0)  # moments are unpadded
        assert (mem.rank, mem.world_size) == (1, 2)


# -------------------------------------- what torch raises, as predicted ----
def layer(*, frozen=False, bf16=False):
    module = Layer()
    if frozen:
        module.l1.requires_grad_(False)
    if bf16:
        module.l2.to(torch.bfloat16)
    return module


def raised(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize(
    "frozen, bf16, uop", [(True, False, False), (False, True, False), (False, True, True), (True, True, False)]
)
def test_fsdp1_rejections_are_predicted(frozen, bf16, uop):
    module = layer(frozen=frozen, bf16=bf16)
    model = fsdp1_layout(specs_of(module), 2, use_orig_params=uop)
    with fake_pg(0, 2), pytest.raises(ValueError) as info:
        FSDP(module, device_id=CPU, use_orig_params=uop)
    assert raised(info.value) == model.raises


def test_fsdp1_frozen_layer_with_use_orig_params_works_and_costs_gradient_memory():
    module = layer(frozen=True)
    model = fsdp1_layout(specs_of(module), 2, use_orig_params=True)
    with fake_pg(0, 2), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fsdp = FSDP(module, device_id=CPU, use_orig_params=True, auto_wrap_policy=ModuleWrapPolicy({Layer}))
        assert layout_of(fsdp).raises is None
    text = " ".join(str(w.message) for w in caught if "requires_grad=True and False" in str(w.message))
    assert re.search(r"\((\d+) numel instead of (\d+) numel", text).groups() == ("93", "63")
    assert "93 elements instead of 63" in model.problems[0].message


def test_fsdp2_mixed_dtype_fails_at_first_forward_unless_in_its_own_group():
    dtypes = lambda s: set(re.search(r"\{(.*)\}", s).group(1).split(", "))  # noqa: E731 (set order varies)
    with fake_pg(0, 2):
        mesh = init_device_mesh("cpu", (2,))
        module = layer(bf16=True)
        model = fsdp2_layout(specs_of(module), 2)
        fully_shard(module, mesh=mesh)  # wrapping succeeds...
        with pytest.raises(AssertionError) as info:  # ...the lazy init at the first forward does not
            module(torch.randn(2, 4))
        assert raised(info.value).split("{")[0] == model.raises.split("{")[0]
        assert dtypes(str(info.value)) == dtypes(model.raises) == {"torch.float32", "torch.bfloat16"}
        assert model.errors[0].when == "at the first forward"

        module = layer(bf16=True, frozen=True)
        fully_shard(module.l2, mesh=mesh)
        fully_shard(module, mesh=mesh)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the Linear layers still need one compute dtype
            module(torch.randn(2, 4)).sum().backward()
        assert module.l2.weight.grad is not None and module.l1.weight.grad is None
        got = layout_of(module)
        assert got.raises is None and got.groups == ("", "", "l2", "l2", "", "")
        assert fsdp2_layout(specs_of(layer(bf16=True)), 2, groups=("l2", "")).raises is None


def test_scalar_parameters_are_rejected_as_predicted():
    class WithScalar(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))
            self.w = torch.nn.Parameter(torch.ones(4))

    specs = specs_of(WithScalar())
    with fake_pg(0, 2):
        with pytest.raises(ValueError) as info:
            FSDP(WithScalar(), device_id=CPU)
        assert raised(info.value) == fsdp1_layout(specs, 2).raises
        with pytest.raises(ValueError) as info:
            fully_shard(WithScalar(), mesh=init_device_mesh("cpu", (2,)))
        assert raised(info.value) == fsdp2_layout(specs, 2).raises
