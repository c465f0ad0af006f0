"""Offline corpora, byte-level blocks, and how a global batch is split across ranks.

Nothing here downloads. The default corpus is the Python standard library's own
`.py` sources, which every Python install carries: the top-level files of the
stdlib folder, sorted by name, concatenated up to a byte cap. Any text or file
works too (`text_corpus`, `load_corpus("path/to/file.txt")`).

Tokens are bytes (ids 0..255, the `GPT` vocab). The corpus is cut into
non-overlapping blocks of `block_size + 1` bytes; a block gives `x = b[:-1]`
and `y = b[1:]`, so the model learns to predict each next byte.

Distributed sampling keeps the single-process picture exact: step `s` has one
global batch of `global_batch_size` block indices, the same on every rank, and
rank `r` takes the contiguous rows `[r * B / W, (r + 1) * B / W)`. Concatenating
the ranks' batches in rank order gives back the global batch, which is what
makes FSDP training comparable, number for number, with one process.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from torch.utils.data import Dataset


def stdlib_corpus(max_bytes: int = 1_000_000) -> bytes:
    """The stdlib's top-level `.py` files, sorted by name, joined by a blank line,
    cut at `max_bytes`. Deterministic for a given Python version."""
    if max_bytes <= 0:
        raise ValueError(f"stdlib_corpus: max_bytes={max_bytes!r} must be positive")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"stdlib_corpus: no .py files in {root}; pass your own text with text_corpus(...)")
    chunks, size = [], 0
    for path in files:
        chunk = path.read_bytes() + b"\n\n"
        chunks.append(chunk[: max_bytes - size])
        size += len(chunks[-1])
        if size >= max_bytes:
            break
    return b"".join(chunks)


def text_corpus(text: str) -> bytes:
    """UTF-8 bytes of `text`: the corpus for a string you already have."""
    return text.encode("utf-8")


def load_corpus(source: str = "stdlib", max_bytes: int = 1_000_000) -> bytes:
    """`"stdlib"` for the standard library sources, otherwise a path to a text file."""
    if source == "stdlib":
        return stdlib_corpus(max_bytes)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"load_corpus: source={source!r} is neither 'stdlib' nor a file")
    return path.read_bytes()[:max_bytes]


class ByteBlocks(Dataset):
    """Fixed-length next-byte examples: item i is `(x, y)`, both `(block_size,)` int64."""

    def __init__(self, data: bytes | torch.Tensor, block_size: int):
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"ByteBlocks: block_size={block_size!r} must be a positive int")
        if isinstance(data, (bytes, bytearray)):
            empty = torch.zeros(0, dtype=torch.uint8)  # frombuffer refuses an empty buffer
            data = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else empty
        self.tokens = data.flatten()  # (N,): bytes (uint8), or token ids (int64) from a tokenizer
        self.block_size = block_size
        if len(self) == 0:
            raise ValueError(
                f"ByteBlocks: the corpus has {self.tokens.numel()} bytes, fewer than one block "
                f"needs (block_size + 1 = {block_size + 1}); give more text or a smaller block_size"
            )

    def __len__(self) -> int:
        # block i covers bytes [i*T, i*T + T + 1): consecutive blocks share one byte
        return max(0, (self.tokens.numel() - 1) // self.block_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.block_size
        chunk = self.tokens[i * T : i * T + T + 1].long()  # (T + 1,)
        return chunk[:-1], chunk[1:]  # (T,), (T,)

    def split(self, val_fraction: float = 0.1) -> tuple[ByteBlocks, ByteBlocks]:
        """(train, val): the last `val_fraction` of the bytes, cut at a block boundary, is val."""
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"ByteBlocks.split: val_fraction={val_fraction!r} must be in (0, 1)")
        n_val = max(1, round(len(self) * val_fraction))
        if n_val >= len(self):
            raise ValueError(f"ByteBlocks.split: {len(self)} blocks cannot give both a train and a val part")
        cut = (len(self) - n_val) * self.block_size
        return (
            ByteBlocks(self.tokens[: cut + 1], self.block_size),
            ByteBlocks(self.tokens[cut:], self.block_size),
        )


def check_batch_split(global_batch_size: int, world_size: int, grad_accum_steps: int = 1) -> int:
    """Rows per rank per micro-step. Raises when the global batch cannot be split evenly."""
    if not isinstance(global_batch_size, int) or global_batch_size <= 0:
        raise ValueError(f"global_batch_size={global_batch_size!r} must be a positive int")
    if global_batch_size < world_size:
        raise ValueError(
            f"global_batch_size={global_batch_size} is smaller than world_size={world_size}: "
            f"every rank needs at least one row; use a global batch of at least {world_size}"
        )
    if global_batch_size % (world_size * grad_accum_steps):
        raise ValueError(
            f"global_batch_size={global_batch_size} must be divisible by world_size * "
            f"grad_accum_steps = {world_size} * {grad_accum_steps} so every rank gets equal "
            f"micro-batches (equal sizes keep the averaged gradient the full-batch gradient)"
        )
    return global_batch_size // (world_size * grad_accum_steps)


class ShardedBatches:
    """The batches one rank trains on.

    `global_indices(step)` is the single-process batch for `step`: positions
    `[step * B, (step + 1) * B)` of an endless stream of epochs, each epoch a
    permutation of the dataset drawn from `seed + epoch` (or in order when
    `shuffle=False`). `batch(step)` returns this rank's contiguous slice of it.
    Step-indexed, so resuming at step s needs no iterator state.
    """

    def __init__(
        self,
        dataset: ByteBlocks,
        *,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if len(dataset) == 0:
            raise ValueError("ShardedBatches: the dataset is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardedBatches: rank={rank} must be in [0, world_size={world_size})")
        self.local_batch_size = check_batch_split(global_batch_size, world_size)
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self._perms: dict[int, torch.Tensor] = {}

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            n = len(self.dataset)
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed + epoch)
                self._perms[epoch] = torch.randperm(n, generator=gen)
            else:
                self._perms[epoch] = torch.arange(n)
        return self._perms[epoch]

    def global_indices(self, step: int) -> list[int]:
        """Dataset indices of the whole global batch at `step` (identical on every rank)."""
        n, B = len(self.dataset), self.global_batch_size
        positions = range(step * B, (step + 1) * B)
        return [int(self._epoch_order(p // n)[p % n]) for p in positions]

    def local_indices(self, step: int) -> list[int]:
        """This rank's rows of the global batch: `[rank * b, (rank + 1) * b)`."""
        b = self.local_batch_size
        return self.global_indices(step)[self.rank * b : (self.rank + 1) * b]

    def batch(self, step: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's `(x, y)` at `step`, each `(global_batch_size / world_size, block_size)`."""
        xs, ys = zip(*(self.dataset[i] for i in self.local_indices(step)))
        return torch.stack(xs).to(device), torch.stack(ys).to(device)  # (b, T), (b, T)
