"""Models used by the tutorials and tests.

`Layer` is the seed's module: three `nn.Linear` layers whose default sizes make
a clear picture of how FSDP1 and FSDP2 cut parameters across ranks.

`GPT` is a small byte-level transformer for real training runs; its `Block`
is the unit FSDP wraps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fsdp_nb.validate import is_int


class Layer(nn.Module):
    """Three Linear layers: `l1 (d_in -> d_hidden)`, `l2 (d_hidden -> d_hidden)`, `l3 (d_hidden -> d_out)`.

    The defaults `Linear(4, 6)`, `Linear(6, 6)`, `Linear(6, 3)` hold 30 + 42 + 21 = 93
    elements: odd, so FSDP1 must pad, and `l3.weight` has 3 rows, so FSDP2's
    row split is uneven on 2 ranks.
    """

    base_model_tp_plan = {"l1": "colwise", "l2": "rowwise"}  # Hugging Face's name; l3 stays whole

    def __init__(self, d_in: int = 4, d_hidden: int = 6, d_out: int = 3, *, bias: bool = True):
        super().__init__()
        for name, value in (("d_in", d_in), ("d_hidden", d_hidden), ("d_out", d_out)):
            if not is_int(value) or value <= 0:
                raise ValueError(f"Layer: {name}={value!r} must be a positive int")
        self.l1 = nn.Linear(d_in, d_hidden, bias=bias)
        self.l2 = nn.Linear(d_hidden, d_hidden, bias=bias)
        self.l3 = nn.Linear(d_hidden, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, d_in)
        x = torch.relu(self.l1(x))  # (B, d_hidden)
        x = torch.relu(self.l2(x))  # (B, d_hidden)
        return self.l3(x)  # (B, d_out)


# ---------------------------------------------------------------------------
# A small GPT: decoder-only transformer over bytes (vocab 256).
# `Block` is the unit FSDP wraps: each block becomes one FSDP1 FlatParameter
# or one FSDP2 parameter group, so one all-gather brings in one whole block.
# ---------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Sizes of a `GPT`. `GPTConfig.debug()` is the tiny size the tests use."""

    vocab_size: int = 256
    """Number of token ids; 256 covers every byte."""
    block_size: int = 128
    """Longest sequence the model accepts (rows of the position embedding)."""
    n_layer: int = 4
    """Number of transformer `Block`s."""
    n_head: int = 4
    """Attention heads per block; must divide `n_embd`."""
    n_embd: int = 128
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout probability; keep 0.0 when comparing runs bit for bit."""
    bias: bool = True
    """Whether Linear and LayerNorm layers carry a bias."""
    tie_embeddings: bool = True
    """If True, `lm_head.weight` is the same Parameter as `wte.weight`."""

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ValueError(f"GPTConfig: {name}={value!r} must be a positive int")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig: dropout={self.dropout!r} must be in [0, 1)")

    @classmethod
    def debug(cls, **overrides) -> GPTConfig:
        """A tiny model (2 blocks, width 32, context 16): ~30k parameters, fast on CPU."""
        sizes = dict(block_size=16, n_layer=2, n_head=2, n_embd=32)
        return cls(**{**sizes, **overrides})


class CausalSelfAttention(nn.Module):
    """Multi-head attention where position t only sees positions <= t.

    [Note: fused qkv under TP]
    `qkv.weight` stacks the rows of q, k and v: [q; k; v], (3C, C). Tensor
    parallelism ("colwise") splits those rows in contiguous blocks, so TP rank 0 of
    2 holds q and half of k, not whole heads. Under TP the forward therefore gathers
    the (B, T, 3C) projection and keeps this rank's heads of each of q, k and v (the
    columns `proj`, "rowwise", expects); backward sums each rank's part of the
    gradient (`grad_placements=[Partial()]`). The heads per rank are n_head / tp.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x)  # (B, T, 3C); under TP (B, T, 3C / tp), this rank's rows of qkv.weight
        if qkv.shape[-1] != 3 * C:  # TP: gather, then keep this rank's heads [Note: fused qkv under TP]
            qkv = _this_ranks_heads(qkv, self.qkv.weight.device_mesh, C)
        q, k, v = qkv.split(qkv.shape[-1] // 3, dim=2)  # 3 x (B, T, C_local), C_local = C / tp
        # split the width into heads: (B, T, C_local) -> (B, nh_local, T, hs)
        hs = C // self.n_head
        q, k, v = (t.view(B, T, -1, hs).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh_local, T, hs)
        y = y.transpose(1, 2).reshape(B, T, q.shape[1] * hs)  # (B, T, C_local)
        return self.proj(y)


def _this_ranks_heads(local: torch.Tensor, tp_mesh, C: int) -> torch.Tensor:
    """(B, T, 3C / tp) rows of [q; k; v] -> (B, T, 3C / tp) of [q_t; k_t; v_t], this TP rank's heads."""
    from torch.distributed.tensor import DTensor, Partial, Shard

    tp, t = tp_mesh.size(), tp_mesh.get_local_rank()
    full = DTensor.from_local(local, tp_mesh, [Shard(2)]).full_tensor(grad_placements=[Partial()])  # (B, T, 3C)
    return torch.cat([part.chunk(tp, dim=2)[t] for part in full.split(C, dim=2)], dim=2)


class MLP(nn.Module):
    """Position-wise feed-forward: C -> 4C -> C with GELU."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, C)
        return self.drop(self.proj(F.gelu(self.fc(x))))  # (B, T, C)


class Block(nn.Module):
    """One transformer block (pre-norm). This is the class FSDP auto-wraps."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, C)
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class GPT(nn.Module):
    """Decoder-only transformer over bytes.

    `GPT(GPTConfig.debug(), seed=0)` always builds the same weights, whatever
    the global RNG state, so every rank (and a single-process reference) starts
    from identical parameters. Built under `torch.device("meta")` it allocates
    nothing; call `init_weights(seed)` after `to_empty(...)` to fill it.
    """

    _no_split_modules = ["Block"]  # the default unit for TRANSFORMER_BASED_WRAP
    # Hugging Face's name and words: what tensor parallelism splits (embeddings, norms, head stay whole)
    base_model_tp_plan = {
        "blocks.*.attn.qkv": "colwise",  # [Note: fused qkv under TP]
        "blocks.*.attn.proj": "rowwise",
        "blocks.*.mlp.fc": "colwise",
        "blocks.*.mlp.proj": "rowwise",
    }

    def __init__(self, config: GPTConfig | None = None, *, seed: int = 0):
        super().__init__()
        self.config = config = config or GPTConfig()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Position ids as a non-persistent buffer, as Hugging Face models keep theirs: never in a
        # checkpoint, so whoever builds the model (a meta rank too) must get its values another way.
        self.register_buffer("pos", torch.arange(config.block_size), persistent=False)  # (block_size,)
        if config.tie_embeddings:
            # one Parameter, two owners: FSDP must keep both in the same group
            self.lm_head.weight = self.wte.weight
        if self.wte.weight.device.type != "meta":
            self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Fill every parameter from a private generator seeded with `seed`.

        Linear and embedding weights ~ N(0, 0.02); the projections that write
        into the residual stream are scaled by 1/sqrt(2 * n_layer); biases 0,
        LayerNorm weights 1; the position buffer 0, 1, 2, ...
        """
        self.pos.copy_(torch.arange(self.config.block_size))
        gen = torch.Generator(device="cpu").manual_seed(seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():  # a tied weight is visited once
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:  # LayerNorm weight
                p.fill_(1.0)
            else:
                std = residual_std if name.endswith("proj.weight") else 0.02
                # draw on CPU so the values never depend on the device
                p.copy_(torch.randn(p.shape, generator=gen) * std)

    def num_params(self) -> int:
        """Number of distinct parameter elements (a tied weight counts once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: (B, T) byte ids. Returns logits (B, T, vocab) and the mean
        cross-entropy against `targets` (B, T), or None without targets."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"GPT: sequence length {T} exceeds block_size={self.config.block_size}")
        x = self.drop(self.wte(idx) + self.wpe(self.pos[:T]))  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(B * T, -1), targets.view(B * T))
        return logits, loss
