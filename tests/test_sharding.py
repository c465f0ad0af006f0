"""shard(): wrap units (pure), then the real thing on the shared 2-rank session.

Multi-process tests run source text on the session's ranks and pull values back;
each compares against a single-process reference where a value can be checked.
"""

import textwrap

import pytest
import torch
from snippets import PATCH_REDUCE_SCATTER

from fsdp_nb.config import FSDPConfig
from fsdp_nb.models import GPT, Block, GPTConfig
from fsdp_nb.session.output import Silent
from fsdp_nb.sharding import apply_activation_checkpointing, wrap_units


def run(session, *sources: str):
    """Run the sources, one after the other, as one cell on every rank."""
    return session.run("\n".join(textwrap.dedent(s) for s in sources), output=Silent()).raise_errors()


RANK_IMPORTS = """
import warnings
import torch
from fsdp_nb.config import FSDPConfig
from fsdp_nb.models import GPT, GPTConfig
from fsdp_nb.optim_guard import check_optimizer
from fsdp_nb.sharding import build_on_rank0, shard
from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
warnings.filterwarnings("ignore")
x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(rank))  # (b, T) per rank
"""


# ---- pure: which modules become units ----------------------------------------------


def test_transformer_wrap_picks_the_blocks():
    model = GPT(GPTConfig.debug(n_layer=3))
    units = wrap_units(model, FSDPConfig(auto_wrap_policy="TRANSFORMER_BASED_WRAP"))  # default: _no_split_modules
    assert units == list(model.blocks)
    named = wrap_units(
        model, FSDPConfig(auto_wrap_policy="TRANSFORMER_BASED_WRAP", transformer_cls_names_to_wrap=["MLP"])
    )
    assert named == [b.mlp for b in model.blocks]
    assert wrap_units(model, FSDPConfig(auto_wrap_policy="NO_WRAP")) == []


def test_size_wrap_counts_only_unclaimed_parameters():
    model = GPT(GPTConfig.debug())
    mlp_numel = sum(p.numel() for p in model.blocks[0].mlp.parameters())  # 8352
    units = wrap_units(model, FSDPConfig(auto_wrap_policy="SIZE_BASED_WRAP", min_num_params=mlp_numel))
    # each MLP qualifies; its block then holds fewer than mlp_numel unclaimed parameters
    assert units == [model.blocks[0].mlp, model.blocks[1].mlp]


def test_a_unit_that_would_split_tied_embeddings_stays_in_the_root():
    tied, untied = GPT(GPTConfig.debug()), GPT(GPTConfig.debug(tie_embeddings=False))
    pick_head = lambda module, recurse, nonwrapped_numel: module.__class__.__name__ in ("Linear", "Embedding")  # noqa: E731
    units = wrap_units(tied, FSDPConfig(auto_wrap_policy=pick_head))
    assert tied.lm_head not in units and tied.wte not in units and tied.wpe in units
    assert untied.lm_head in wrap_units(untied, FSDPConfig(auto_wrap_policy=pick_head))


def test_missing_wrap_class_lists_what_the_model_has():
    with pytest.raises(ValueError) as err:
        wrap_units(
            GPT(GPTConfig.debug()),
            FSDPConfig(auto_wrap_policy="TRANSFORMER_BASED_WRAP", transformer_cls_names_to_wrap=["LlamaDecoderLayer"]),
        )
    message = str(err.value)
    assert "['LlamaDecoderLayer']" in message and "'Block'" in message and "'CausalSelfAttention'" in message


def test_activation_checkpointing_wraps_the_units_in_place():
    model = GPT(GPTConfig.debug())
    config = FSDPConfig(auto_wrap_policy="TRANSFORMER_BASED_WRAP", activation_checkpointing=True)
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    before = model(idx, idx)[1]
    wrapped = apply_activation_checkpointing(model, wrap_units(model, config), config)
    assert [type(w).__name__ for w in wrapped] == ["CheckpointWrapper"] * 2
    assert list(model.blocks) == wrapped and isinstance(wrapped[0]._checkpoint_wrapped_module, Block)
    torch.testing.assert_close(model(idx, idx)[1], before)


# ---- on 2 ranks -----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_stale_optimizer_is_detected_and_step_refuses(session):
    run(
        session,
        RANK_IMPORTS,
        """
    model = GPT(GPTConfig.debug())
    early = torch.optim.AdamW(model.parameters())        # built BEFORE sharding: wrong
    sharded = shard(model, FSDPConfig(auto_wrap_policy="TRANSFORMER_BASED_WRAP"))
    late = torch.optim.AdamW(sharded.parameters())
    check_optimizer(sharded, late)                        # fine: returns None
    messages = []
    for attempt in (lambda: check_optimizer(sharded, early), early.step):
        try:
            attempt()
        except RuntimeError as e:
            messages.append(str(e))
    """,
    )
    messages = session.eval("messages")
    assert all(len(m) == 2 for m in messages)
    assert "holds 28 of its 28 tensors from before shard()" in messages[0][0]
    assert "Build the optimizer after sharding" in messages[0][1]


@pytest.mark.timeout(60)
def test_fsdp2_forward_prefetch_chains_the_blocks(session):
    run(
        session,
        RANK_IMPORTS,
        """
    model = shard(GPT(GPTConfig.debug(n_layer=3)),
                  FSDPConfig(auto_wrap_policy="TRANSFORMER_BASED_WRAP", forward_prefetch=True))
    states = [b._get_fsdp_state() for b in model.blocks]
    chain = [[states.index(s) for s in st._states_to_forward_prefetch] for st in states]
    tied = model.lm_head.weight is model.wte.weight and type(model.wte.weight).__name__ == "DTensor"
    loss = model(x, x)[1]
    loss.backward()
    """,
    )
    assert session.eval("chain") == [[[1], [2], []]] * 2  # block i gathers block i+1 during its forward
    assert session.eval("tied") == [True, True]  # one DTensor, sharded once, in the root's group


@pytest.mark.timeout(60)
@pytest.mark.parametrize("version", [1, 2])
def test_bf16_computes_in_bf16_and_reduces_gradients_in_fp32(session, version):
    run(
        session,
        RANK_IMPORTS,
        PATCH_REDUCE_SCATTER,
        f"""
    model = shard(GPT(GPTConfig.debug()), FSDPConfig(fsdp_version={version}, mixed_precision="bf16",
                  auto_wrap_policy="TRANSFORMER_BASED_WRAP"))
    reduce_dtypes, compute_dtypes = set(), set()
    def on_reduce_scatter(input):   # the collective both FSDP versions call
        reduce_dtypes.add(str(input.dtype))
    qkv = [m for n, m in model.named_modules() if n.replace("_fsdp_wrapped_module.", "") == "blocks.0.attn.qkv"][0]
    qkv.register_forward_hook(lambda m, i, o: compute_dtypes.add(str(m.weight.dtype)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    patch_reduce_scatter()
    try:
        losses = []
        for _ in range(4):
            loss = model(x, x)[1]
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    finally:
        unpatch_reduce_scatter()
    param_dtypes = {{str(p.dtype) for p in model.parameters()}}
    policy = model.mixed_precision if {version} == 1 else model._get_fsdp_state()._mp_policy
    declared = (str(policy.param_dtype), str(policy.reduce_dtype))
    """,
    )
    for rank_values in zip(
        *(session.eval(n) for n in ("reduce_dtypes", "compute_dtypes", "param_dtypes", "declared", "losses"))
    ):
        reduce_dtypes, compute_dtypes, param_dtypes, declared, losses = rank_values
        assert reduce_dtypes == {"torch.float32"}  # what crossed the wire
        assert compute_dtypes == {"torch.bfloat16"}
        assert param_dtypes == {"torch.float32"}  # sharded master weights stay fp32
        assert declared == ("torch.bfloat16", "torch.float32")
        assert losses[-1] < losses[0] - 0.5  # it trains: memorising one batch


FREEZE = """
model = GPT(GPTConfig.debug())
for p in model.blocks[0].attn.qkv.parameters():          # freeze the first layer of the first block
    p.requires_grad_(False)
frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("version", [1, 2])
def test_partial_freezing_trains_the_rest_only(session, version):
    run(
        session,
        RANK_IMPORTS,
        FREEZE,
        f"""
    trained_before = {{n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}
    sharded = shard(model, FSDPConfig(fsdp_version={version}, use_orig_params=True,
                    auto_wrap_policy="TRANSFORMER_BASED_WRAP"))
    opt = torch.optim.AdamW([p for p in sharded.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        sharded(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    after = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    frozen_change = max((after[n] - v).abs().max().item() for n, v in frozen_before.items())
    unchanged_trainable = [n for n, v in trained_before.items() if torch.equal(after[n], v)]
    """,
    )
    assert session.eval("sorted(frozen_before)") == [["blocks.0.attn.qkv.bias", "blocks.0.attn.qkv.weight"]] * 2
    assert session.eval("frozen_change") == [0.0, 0.0]
    assert session.eval("unchanged_trainable") == [[], []]


@pytest.mark.timeout(60)
def test_fsdp1_flat_parameters_cannot_mix_frozen_and_trainable(session):
    run(
        session,
        RANK_IMPORTS,
        FREEZE,
        """
    try:
        shard(model, FSDPConfig(fsdp_version=1, use_orig_params=False, auto_wrap_policy="TRANSFORMER_BASED_WRAP"))
        message, cause = None, None
    except ValueError as e:
        message, cause = str(e), str(e.__cause__)
    """,
    )
    message, cause = session.eval("message")[0], session.eval("cause")[0]
    assert "cannot mix frozen and trainable parameters" in message and "use_orig_params=True" in message
    assert "requires_grad" in cause  # torch's own error is kept as the cause


@pytest.mark.timeout(60)
@pytest.mark.parametrize("version", [1, 2])
def test_cpu_ram_efficient_loading_gives_every_rank_rank0_weights(session, version):
    run(
        session,
        RANK_IMPORTS,
        f"""
    config = FSDPConfig(fsdp_version={version}, cpu_ram_efficient_loading=True,
                        auto_wrap_policy="TRANSFORMER_BASED_WRAP")
    built = build_on_rank0(lambda: GPT(GPTConfig.debug(), seed=11), config)
    built_on = built.wte.weight.device.type
    model = shard(built, config)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    loss = model(x, x)[1].item()
    """,
    )
    assert session.eval("built_on") == ["cpu", "meta"]
    reference = GPT(GPTConfig.debug(), seed=11)
    expected = reference.state_dict()
    for full in session.eval("full"):
        assert sorted(full) == sorted(expected)
        for name, value in expected.items():
            torch.testing.assert_close(full[name], value, rtol=0, atol=0, msg=name)
    for r, loss in enumerate(session.eval("loss")):
        x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(r))
        assert loss == pytest.approx(reference(x, x)[1].item(), abs=1e-5)


@pytest.mark.timeout(60)
def test_fsdp1_sync_module_states_works_on_cpu(session):
    run(
        session,
        RANK_IMPORTS,
        """
    model = shard(GPT(GPTConfig.debug(), seed=100 + rank),      # different weights per rank
                  FSDPConfig(fsdp_version=1, sync_module_states=True, auto_wrap_policy="TRANSFORMER_BASED_WRAP"))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    """,
    )
    expected = GPT(GPTConfig.debug(), seed=100).state_dict()  # rank 0's
    for full in session.eval("full"):
        for name, value in expected.items():
            torch.testing.assert_close(full[name], value, rtol=0, atol=0, msg=name)
