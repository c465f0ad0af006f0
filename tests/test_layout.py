"""Pure layout math: the seed's facts, invariants at every world size, problems, errors."""

from __future__ import annotations

import math
import pickle
import random

import pytest
import torch

from fsdp_nb.layout import Fsdp1Layout, ParamSpec, Segment, chunk_range, fsdp1_layout, fsdp2_layout, specs_of
from fsdp_nb.models import Layer


def layer_specs(*, frozen=(), bf16=(), dims=(4, 6, 3)):
    return tuple(
        ParamSpec(
            name=s.name,
            shape=s.shape,
            dtype=torch.bfloat16 if s.name.split(".")[0] in bf16 else torch.float32,
            requires_grad=s.name.split(".")[0] not in frozen,
        )
        for s in specs_of(Layer(*dims))
    )


# ------------------------------------------------------------ seed facts ----
def test_fsdp1_default_layer_on_two_ranks():
    lay = fsdp1_layout(layer_specs(), 2)
    assert (lay.total_numel, lay.padded_numel, lay.padding_numel, lay.chunk_numel) == (93, 94, 1, 47)
    assert lay.segments(0) == (("l1.weight", 0, 24), ("l1.bias", 0, 6), ("l2.weight", 0, 17))
    assert lay.segments(1) == (
        ("l2.weight", 17, 36),
        ("l2.bias", 0, 6),
        ("l3.weight", 0, 18),
        ("l3.bias", 0, 3),
        (None, 0, 1),
    )
    assert [(b.real, b.padding) for b in lay.bytes_per_rank] == [(47 * 4, 0), (46 * 4, 4)]
    assert lay.raises is None and lay.problems == ()


def test_fsdp1_use_orig_params_aligns_every_parameter_to_16_bytes():
    lay = fsdp1_layout(layer_specs(), 2, use_orig_params=True)
    assert [s.numel for s in lay.flat] == [24, 6, 2, 36, 6, 2, 18, 2, 3, 1]  # as torch's _numels_with_padding
    assert (lay.padded_numel, lay.chunk_numel) == (100, 50)
    offset = 0
    for seg in lay.flat:
        if seg.name is not None:
            assert offset % 4 == 0, f"{seg.name} starts at {offset}"
        offset += seg.numel


@pytest.mark.parametrize(
    "dtype, param_dtype, align",
    [(torch.bfloat16, None, 8), (torch.float32, torch.bfloat16, 8), (torch.float32, None, 4), (torch.float64, None, 2)],
)
def test_alignment_follows_the_unsharded_dtype(dtype, param_dtype, align):
    specs = [ParamSpec(name=s.name, shape=s.shape, dtype=dtype) for s in layer_specs()]
    lay = fsdp1_layout(specs, 3, use_orig_params=True, param_dtype=param_dtype)
    starts, offset = [], 0
    for seg in lay.flat:
        if seg.name is not None:
            starts.append(offset)
        offset += seg.numel
    assert all(s % align == 0 for s in starts)
    assert all(seg.numel < align for seg in lay.flat[:-1] if seg.name is None)  # the least padding that aligns
    assert offset % 3 == 0  # world-size padding is part of the flat tensor
    if align == 8:
        assert [s.numel for s in lay.flat] == [24, 6, 2, 36, 4, 6, 2, 18, 6, 3, 1]


def test_fsdp2_default_layer_on_two_ranks():
    lay = fsdp2_layout(layer_specs(), 2)
    assert lay.local_shape("l3.weight", 0) == (2, 6) and lay.local_shape("l3.weight", 1) == (1, 6)
    assert lay.rows("l3.weight", 1) == (2, 3)
    assert lay.padded_local_shape("l3.weight") == (2, 6) and lay.padded_dim0("l3.weight") == 4
    assert lay.local_shape("l1.weight", 1) == (3, 4)
    # rank 1 stores 43 real elements and pads l3.weight and l3.bias by one row each: 6 + 1 elements.
    assert [(b.real, b.padding) for b in lay.bytes_per_rank] == [(50 * 4, 0), (43 * 4, 7 * 4)]


# ---------------------------------------------------------- invariants ----
def random_specs(rng):
    specs = []
    for i in range(rng.randint(1, 6)):
        rows = rng.randint(1, 11)
        shape = (rows,) if rng.random() < 0.4 else (rows, rng.randint(1, 7))
        specs.append(ParamSpec(name=f"p{i}", shape=shape))
    return specs


@pytest.mark.parametrize("world_size", range(1, 9))
def test_fsdp1_every_element_lives_on_exactly_one_rank(world_size):
    rng = random.Random(world_size)
    for _ in range(30):
        specs = random_specs(rng)
        for uop in (False, True):
            lay = fsdp1_layout(specs, world_size, use_orig_params=uop)
            seen = {s.name: [] for s in specs}
            for r in range(world_size):
                segs = lay.segments(r)
                assert sum(seg.numel for seg in segs) == lay.chunk_numel
                for seg in segs:
                    if seg.name is not None:
                        seen[seg.name].extend(range(seg.start, seg.stop))
            assert all(sorted(v) == list(range(lay.param(k).numel)) for k, v in seen.items())
            assert lay.padded_numel % world_size == 0
            assert sum(b.padding for b in lay.bytes_per_rank) == lay.padding_numel * 4
            if not uop:  # only the tail pads
                assert lay.padded_numel == math.ceil(lay.total_numel / world_size) * world_size


@pytest.mark.parametrize("world_size", range(1, 9))
def test_fsdp2_rows_follow_torch_chunk(world_size):
    rng = random.Random(100 + world_size)
    for _ in range(30):
        specs = random_specs(rng)
        lay = fsdp2_layout(specs, world_size)
        for s in specs:
            chunks = torch.arange(s.shape[0]).chunk(world_size)  # what FSDP2's _chunk_with_empty uses
            for r in range(world_size):
                want = chunks[r].tolist() if r < len(chunks) else []
                start, stop = lay.rows(s.name, r)
                assert list(range(start, stop)) == want
                assert lay.local_shape(s.name, r) == (len(want),) + s.shape[1:]
            assert lay.padded_rows[lay.params.index(s)] == len(chunks[0])


def test_fewer_rows_than_ranks_gives_empty_shards():
    lay = fsdp2_layout(layer_specs(), 8)
    assert [lay.local_shape("l3.weight", r) for r in range(8)] == [(1, 6)] * 3 + [(0, 6)] * 5
    assert [lay.local_shape("l2.bias", r) for r in range(8)] == [(1,)] * 6 + [(0,)] * 2
    assert chunk_range(6, 4, 3) == (6, 6)  # torch.chunk(6 rows, 4) makes 3 chunks of 2, not 2-2-1-1


def test_fsdp1_tiny_flat_parameter_leaves_whole_ranks_as_padding():
    lay = fsdp1_layout([ParamSpec(name="w", shape=(3,))], 8)
    assert [lay.segments(r) for r in range(4)] == [(("w", 0, 1),), (("w", 1, 2),), (("w", 2, 3),), ((None, 0, 1),)]


# ------------------------------------------------------------ problems ----
def test_fsdp1_frozen_layer_needs_use_orig_params():
    lay = fsdp1_layout(layer_specs(frozen={"l1"}), 2)
    assert lay.raises == "ValueError: Must flatten tensors with uniform `requires_grad` when `use_orig_params=False`"
    assert "l1.weight, l1.bias are frozen" in lay.errors[0].message
    lay = fsdp1_layout(layer_specs(frozen={"l1"}), 2, use_orig_params=True)
    assert lay.raises is None
    (warning,) = lay.problems
    assert warning.severity == "warning" and "93 elements instead of 63" in warning.message


def test_fsdp1_mixed_dtype_is_rejected_even_with_use_orig_params():
    for uop in (False, True):
        lay = fsdp1_layout(layer_specs(bf16={"l2"}), 2, use_orig_params=uop)
        assert (
            lay.raises == "ValueError: Must flatten tensors with uniform dtype but got torch.float32 and torch.bfloat16"
        )


def test_fsdp1_reports_the_first_error_torch_meets():
    lay = fsdp1_layout(layer_specs(frozen={"l1"}, bf16={"l2"}), 2)
    assert [p.raises.split(" with uniform ")[1].split()[0] for p in lay.errors] == ["dtype", "`requires_grad`"]


def test_fsdp2_dtype_check_is_per_group_and_ignores_frozen_parameters():
    assert fsdp2_layout(layer_specs(bf16={"l2"}), 2).raises.startswith(
        "AssertionError: FSDP expects uniform original parameter dtype but got {"
    )
    assert fsdp2_layout(layer_specs(bf16={"l2"}), 2).errors[0].when == "at the first forward"
    assert fsdp2_layout(layer_specs(bf16={"l2"}), 2, groups=("l2", "")).problems == ()
    assert fsdp2_layout(layer_specs(bf16={"l1"}, frozen={"l1"}), 2).problems == ()
    assert fsdp2_layout(layer_specs(frozen={"l1"}), 2).problems == ()
    assert fsdp2_layout(layer_specs(bf16={"l2"}), 2, groups=("l1", "l2", "l3", "")).groups == (
        "l1",
        "l1",
        "l2",
        "l2",
        "l3",
        "l3",
    )


def test_scalar_parameters_are_rejected_by_both():
    specs = [ParamSpec(name="scale", shape=()), ParamSpec(name="w", shape=(4,))]
    assert fsdp1_layout(specs, 2).raises.startswith("ValueError: FSDP doesn't support scalar parameters. Change scale")
    assert fsdp2_layout(specs, 2).raises.startswith("ValueError: fully_shard doesn't support scalar parameters.")


# -------------------------------------------------------------- errors ----
@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_world_size(bad):
    with pytest.raises(ValueError, match="world_size"):
        fsdp1_layout(layer_specs(), bad)
    with pytest.raises(ValueError, match="world_size"):
        fsdp2_layout(layer_specs(), bad)


@pytest.mark.parametrize("shape", [(0, 4), (3, -1), (2, 2.0)])
def test_non_positive_dims(shape):
    with pytest.raises(ValueError, match=r"l9.weight.*every dim must be a positive int"):
        ParamSpec(name="l9.weight", shape=shape)


def test_unknown_names_and_ranks():
    lay = fsdp2_layout(layer_specs(), 2)
    with pytest.raises(KeyError, match="l4.weight"):
        lay.rows("l4.weight", 0)
    with pytest.raises(KeyError, match="l4.weight"):
        lay.local_shape("l4.weight", 0)
    with pytest.raises(ValueError, match=r"rank=2 must be an int in \[0, 2\)"):
        lay.local_shape("l1.weight", 2)
    with pytest.raises(ValueError, match="rank=-1"):
        fsdp1_layout(layer_specs(), 2).segments(-1)
    with pytest.raises(ValueError, match="'l4' owns no parameter"):
        fsdp2_layout(layer_specs(), 2, groups=("l4", ""))
    with pytest.raises(ValueError, match="non-empty"):
        fsdp1_layout([], 2)
    with pytest.raises(ValueError, match="unique"):
        fsdp1_layout([ParamSpec(name="w", shape=(2,))] * 2, 2)
    with pytest.raises(ValueError, match="equal numel"):
        Fsdp1Layout(
            params=layer_specs()[:1],
            world_size=2,
            use_orig_params=False,
            flat=(Segment("l1.weight", 0, 24),),
            shards=((Segment("l1.weight", 0, 20),), (Segment("l1.weight", 20, 24),)),
        )


def test_layouts_pickle_and_compare_by_value():
    for lay in (fsdp1_layout(layer_specs(bf16={"l2"}), 3, use_orig_params=True), fsdp2_layout(layer_specs(), 5)):
        again = pickle.loads(pickle.dumps(lay))
        assert again == lay and again.bytes_per_rank == lay.bytes_per_rank


def test_merge_observed_takes_each_rank_from_itself():
    from dataclasses import replace

    from fsdp_nb.layout.inspect import merge_observed  # kernel side, but pure

    model = fsdp2_layout(layer_specs(), 2)
    seen = [replace(model, observed_ranks=(r,)) for r in range(2)]
    assert merge_observed(seen) == replace(model, observed_ranks=(0, 1))
    with pytest.raises(ValueError, match="not rank 1's view"):
        merge_observed([seen[0], seen[0]])
    with pytest.raises(ValueError, match="got 1 layouts"):
        merge_observed(seen[:1])


def test_public_signatures_take_positional_arguments_as_documented():
    """As the issue spells them: ParamSpec(name, shape, dtype, requires_grad), fsdp1_layout(specs, world, uop)."""
    import torch

    from fsdp_nb.layout.model import ParamSpec, fsdp1_layout, fsdp2_layout

    specs = [ParamSpec("w", (3, 4)), ParamSpec("b", (3,), torch.float32, True)]
    assert fsdp1_layout(specs, 2, True).use_orig_params is True
    assert fsdp1_layout(specs, 2).segments(0) == (("w", 0, 8),)
    assert fsdp2_layout(specs, 2).rows("w", 1) == (2, 3) and fsdp2_layout(specs, 2).local_shape("w", 1) == (1, 4)
