"""GPT: shapes, deterministic init, tied embeddings, causality. Pure, one process."""

import math

import pytest
import torch

from fsdp_nb.models import GPT, Block, GPTConfig


def test_debug_model_shapes_and_initial_loss():
    cfg = GPTConfig.debug()
    model = GPT(cfg, seed=0)
    idx = torch.randint(0, 256, (3, cfg.block_size), generator=torch.Generator().manual_seed(1))
    logits, loss = model(idx, idx.roll(-1, dims=1))
    assert logits.shape == (3, cfg.block_size, 256)
    # small weights give near-uniform predictions: loss close to ln(256)
    assert abs(loss.item() - math.log(256)) < 0.1
    assert model(idx)[1] is None
    assert sum(isinstance(m, Block) for m in model.modules()) == cfg.n_layer


def test_init_depends_on_seed_only():
    torch.manual_seed(123)
    a = GPT(GPTConfig.debug(), seed=7)
    torch.manual_seed(456)  # the global RNG must not matter
    b = GPT(GPTConfig.debug(), seed=7)
    c = GPT(GPTConfig.debug(), seed=8)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
    assert not torch.equal(a.wte.weight, c.wte.weight)


def test_tied_embeddings_are_one_parameter():
    cfg = GPTConfig.debug()
    tied, untied = GPT(cfg), GPT(GPTConfig.debug(tie_embeddings=False))
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_params() - tied.num_params() == cfg.vocab_size * cfg.n_embd


def test_meta_build_then_init_weights_matches_direct_build():
    cfg = GPTConfig.debug(tie_embeddings=False)
    with torch.device("meta"):
        lazy = GPT(cfg, seed=3)
    assert lazy.wte.weight.is_meta
    lazy.to_empty(device="cpu")
    lazy.init_weights(seed=3)
    for pa, pb in zip(lazy.parameters(), GPT(cfg, seed=3).parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_attention_is_causal():
    model = GPT(GPTConfig.debug(), seed=0)
    idx = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    changed = idx.clone()
    changed[0, 6] = (idx[0, 6] + 1) % 256  # change one future token
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])  # positions before 6 cannot see it
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_bad_config_and_too_long_input_are_explained():
    with pytest.raises(ValueError, match="n_embd=30 must be divisible by n_head=4"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="n_layer=0"):
        GPTConfig.debug(n_layer=0)
    with pytest.raises(ValueError, match="exceeds block_size=16"):
        GPT(GPTConfig.debug())(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("sizes", [dict(d_in=0), dict(d_hidden=-1), dict(d_out=2.5), dict(d_in=True)])
def test_layer_sizes_must_be_positive_ints(sizes):
    from fsdp_nb.models import Layer

    name = next(iter(sizes))
    with pytest.raises(ValueError, match=f"Layer: {name}=.* must be a positive int"):
        Layer(**sizes)


def test_default_layer_is_the_seed_module():
    from fsdp_nb.models import Layer

    m = Layer()
    assert [tuple(p.shape) for p in m.parameters()] == [(6, 4), (6,), (6, 6), (6,), (3, 6), (3,)]
    assert sum(p.numel() for p in m.parameters()) == 93
