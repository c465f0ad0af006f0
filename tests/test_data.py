"""Corpus, byte blocks and the split of a global batch across ranks. Pure, one process."""

import pytest
import torch

from fsdp_nb.data import ByteBlocks, ShardedBatches, check_batch_split, load_corpus, stdlib_corpus, text_corpus


def test_stdlib_corpus_is_deterministic_and_capped():
    a, b = stdlib_corpus(20_000), stdlib_corpus(20_000)
    assert a == b and len(a) == 20_000
    assert stdlib_corpus(40_000)[:20_000] == a  # a larger cap extends, never reorders
    assert load_corpus("stdlib", 20_000) == a


def test_blocks_shift_by_one_byte():
    data = text_corpus("abcdefghij")  # 10 bytes, block_size 3 -> blocks start at 0, 3, 6
    blocks = ByteBlocks(data, 3)
    assert len(blocks) == 3
    x, y = blocks[1]
    assert bytes(x.tolist()) == b"def" and bytes(y.tolist()) == b"efg"
    assert x.dtype == torch.long and x.shape == (3,)


def test_split_keeps_every_byte_once():
    blocks = ByteBlocks(stdlib_corpus(10_000), 16)
    train, val = blocks.split(0.2)
    assert len(train) + len(val) == len(blocks)
    torch.testing.assert_close(train[len(train) - 1][0], blocks[len(train) - 1][0])
    torch.testing.assert_close(val[0][0], blocks[len(train)][0])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_rank_batches_concatenate_to_the_global_batch(world_size):
    blocks = ByteBlocks(stdlib_corpus(20_000), 16)
    single = ShardedBatches(blocks, global_batch_size=6, seed=5)
    ranks = [
        ShardedBatches(blocks, global_batch_size=6, rank=r, world_size=world_size, seed=5) for r in range(world_size)
    ]
    for step in (0, 1, 500):  # 500 * 6 rows wraps into later epochs
        x_full, y_full = single.batch(step)
        parts = [rb.batch(step) for rb in ranks]
        torch.testing.assert_close(torch.cat([x for x, _ in parts]), x_full, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([y for _, y in parts]), y_full, rtol=0, atol=0)
    assert single.global_indices(0) != single.global_indices(1)


def test_one_epoch_visits_every_block_once():
    blocks = ByteBlocks(stdlib_corpus(16 * 12 + 1), 16)  # exactly 12 blocks
    batches = ShardedBatches(blocks, global_batch_size=4, seed=0)
    seen = sum((batches.global_indices(s) for s in range(3)), [])
    assert sorted(seen) == list(range(12)) and seen != list(range(12))  # shuffled


def test_bad_inputs_are_explained():
    with pytest.raises(ValueError, match="fewer than one block"):
        ByteBlocks(b"", 16)
    with pytest.raises(ValueError, match="fewer than one block"):
        ByteBlocks(b"0123456789", 16)
    with pytest.raises(ValueError, match="smaller than world_size=4"):
        check_batch_split(2, 4)
    with pytest.raises(ValueError, match="divisible by world_size"):
        check_batch_split(6, 4)
    with pytest.raises(ValueError, match="divisible by world_size \\* grad_accum_steps = 2 \\* 2"):
        check_batch_split(6, 2, grad_accum_steps=2)
    assert check_batch_split(8, 2, grad_accum_steps=2) == 2
    with pytest.raises(ValueError, match="smaller than world_size=3"):
        ShardedBatches(ByteBlocks(stdlib_corpus(1000), 16), global_batch_size=2, rank=0, world_size=3)
