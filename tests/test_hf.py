"""Hugging Face causal LMs and PEFT adapters train like one process, under FSDP1 and FSDP2.

Tiny models built from configs (no download): Llama, Qwen2 and GPT-2 of transformers 5.
The reference runs in the pytest process on the whole global batch; the sharded runs on
the shared 2-rank session. Both run the same `BUILD` source, so the models start equal.

Tolerances: fp32 runs match one process within 1e-5 relative, as every parity test here.
bf16 (`mixed_precision="bf16"`: bf16 compute, fp32 reduction) is compared with the fp32
reference at 2e-2 relative; a run on wrong weights is off by far more.
"""

from __future__ import annotations

import textwrap
from functools import cache

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytestmark = pytest.mark.timeout(120)

from fsdp_nb.session.output import Silent  # noqa: E402

TRAIN = dict(steps=3, global_batch_size=4, lr=3e-3, log_interval=0)
FP32, BF16 = dict(rtol=1e-5, atol=1e-6), dict(rtol=2e-2, atol=1e-3)

BUILD = f"""
import warnings
warnings.filterwarnings("ignore")
import torch
import transformers
from peft import LoraConfig, get_peft_model
from fsdp_nb import FSDPConfig, Trainer, TrainConfig
from fsdp_nb.data import ByteBlocks, stdlib_corpus
from fsdp_nb.loading import build_on_rank0

SMALL = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
ARCHS = {{
    "llama": ("LlamaConfig", "LlamaForCausalLM", SMALL),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", SMALL),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=256, n_embd=32, n_layer=2, n_head=2,
             n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
}}
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)

def build(arch, lora=False):
    config_cls, model_cls, kwargs = ARCHS[arch]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))
    return get_peft_model(model, LoraConfig(**LORA)) if lora else model

def data():
    return ByteBlocks(stdlib_corpus(20_000), 16)

def train_run(arch, fsdp=None, lora=False, train={TRAIN!r}):
    if fsdp is not None and fsdp.get("cpu_ram_efficient_loading"):
        model = build_on_rank0(lambda: build(arch, lora), FSDPConfig(**fsdp))
    else:
        model = build(arch, lora)
    trainer = Trainer(model, data(), TrainConfig(**train), fsdp=FSDPConfig(**fsdp) if fsdp else None)
    return trainer, trainer.fit()
"""

ON_RANKS = """
trainer, history = train_run({arch!r}, {fsdp!r}, lora={lora!r})
losses = [h["loss"] for h in history]
norms = [h["grad_norm"] for h in history]
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel as FSDP
units = sorted({{type(m.module).__name__ if isinstance(m, FSDP) else type(m).__name__.removeprefix("FSDP")
                 for m in trainer.model.modules() if isinstance(m, (FSDP, FSDPModule))}})
"""


def run(session, *sources: str):
    return session.run("\n".join(textwrap.dedent(s) for s in sources), output=Silent()).raise_errors()


@cache
def here() -> dict:
    """BUILD's names, in the pytest process."""
    scope: dict = {}
    exec(BUILD, scope)
    return scope


@cache
def reference(arch: str, lora: bool = False) -> tuple[list[float], list[float]]:
    """One process, the whole global batch, no FSDP: losses and gradient norms."""
    _, history = here()["train_run"](arch, lora=lora)
    return [h["loss"] for h in history], [h["grad_norm"] for h in history]


def sharded(session, arch: str, fsdp: dict, lora: bool = False) -> list[tuple[list[float], list[float]]]:
    run(session, BUILD, ON_RANKS.format(arch=arch, fsdp=fsdp, lora=lora))
    return session.eval("(losses, norms)")


def assert_close(got: list[float], want: list[float], tol: dict) -> None:
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), **tol)


# ---- the model protocol ----------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_first_loss_is_the_models_own_loss_on_the_same_ids(arch):
    """Parity with one process cannot catch a double shift (both would shift twice); this can."""
    from fsdp_nb.data import ShardedBatches
    from fsdp_nb.model_forms import block_ids

    ns = here()
    x, y = ShardedBatches(ns["data"](), global_batch_size=TRAIN["global_batch_size"]).batch(0)
    ids = block_ids(x, y)  # (4, 17)
    assert torch.equal(ids[:, 1:], y) and torch.equal(ids[:, :-1], x)
    with torch.no_grad():
        own = ns["build"](arch)(input_ids=ids, labels=ids).loss.item()
        shifted_twice = ns["build"](arch)(input_ids=x, labels=y).loss.item()
    losses, _ = reference(arch)
    assert losses[0] == pytest.approx(own, rel=1e-6)
    assert abs(losses[0] - shifted_twice) > 1e-3  # the check can tell the two apart


def test_loss_fn_wins_and_a_model_of_no_form_is_refused_in_one_line():
    from torch import nn

    from fsdp_nb import TrainConfig, Trainer

    ns = here()
    calls = []

    def loss_fn(model, batch):
        x, y = batch
        calls.append(x.shape)
        return model(input_ids=x, labels=x).loss  # any rule the user likes

    trainer = Trainer(ns["build"]("llama"), ns["data"](), TrainConfig(**{**TRAIN, "steps": 1}), loss_fn=loss_fn)
    assert trainer.form == "loss_fn"
    trainer.fit()
    assert calls == [torch.Size([4, 16])]

    class OneArg(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return x * self.w

    with pytest.raises(TypeError) as err:
        Trainer(OneArg(), ns["data"](), TrainConfig(**TRAIN))
    message = str(err.value)
    assert "\n" not in message and "OneArg.forward cannot be called as model(x, y)" in message
    assert "loss_fn" in message and "labels" in message


# ---- parity with one process -----------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_each_architecture_matches_one_process(session, arch, version):
    fsdp = dict(fsdp_version=version, auto_wrap_policy="TRANSFORMER_BASED_WRAP")
    ref_losses, ref_norms = reference(arch)
    for losses, norms in sharded(session, arch, fsdp):
        assert_close(losses, ref_losses, FP32)
        assert_close(norms, ref_norms, FP32)
    (block,) = here()["build"](arch)._no_split_modules
    units = session.eval("units")[0]
    assert block in units  # wrapped on the model's _no_split_modules


VARIANTS = {  # on one architecture, to keep the suite fast
    "fsdp1-checkpointing-ram": dict(fsdp_version=1, activation_checkpointing=True, cpu_ram_efficient_loading=True),
    "fsdp2-checkpointing": dict(fsdp_version=2, activation_checkpointing=True),
    "fsdp2-ram": dict(fsdp_version=2, cpu_ram_efficient_loading=True),
    "fsdp2-bf16": dict(fsdp_version=2, mixed_precision="bf16"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_llama_with_checkpointing_ram_efficient_loading_and_bf16(session, variant):
    fsdp = {**VARIANTS[variant], "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}
    tol = BF16 if "bf16" in variant else FP32
    ref_losses, _ = reference("llama")
    for losses, _ in sharded(session, "llama", fsdp):
        assert_close(losses, ref_losses, tol)


def test_one_checkpointing_switch_only(session):
    source = """
    model = build("llama")
    model.gradient_checkpointing_enable()
    Trainer(model, data(), TrainConfig(steps=1, global_batch_size=4),
            fsdp=FSDPConfig(fsdp_version=2, auto_wrap_policy="TRANSFORMER_BASED_WRAP", activation_checkpointing=True))
    """
    result = session.run(BUILD + textwrap.dedent(source), output=Silent())
    assert len(result.errors) == 2  # refused on every rank, before any collective
    for error in result.errors:
        assert "_checkpointing_disable() and keep activation_checkpointing=True" in str(error)


# ---- PEFT LoRA ---------------------------------------------------------------------------


def test_lora_under_fsdp2_trains_only_the_adapters_and_matches_one_process(session):
    fsdp = dict(fsdp_version=2, auto_wrap_policy="TRANSFORMER_BASED_WRAP")
    ref_losses, ref_norms = reference("llama", lora=True)
    for losses, norms in sharded(session, "llama", fsdp, lora=True):
        assert_close(losses, ref_losses, FP32)
        assert_close(norms, ref_norms, FP32)
    run(
        session,
        """
        trainable = sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad)
        state = trainer.optimizer.state
        with_state = sorted(n for n, p in trainer.model.named_parameters() if p in state)
        lora_bytes = sum(p.to_local().numel() * p.element_size() for n, p in trainer.model.named_parameters()
                         if p.requires_grad)
        adam_bytes = sum(t.to_local().numel() * t.element_size() for s in state.values()
                         for k, t in s.items() if k != "step")
        """,
    )
    trainable, with_state = session.eval("trainable")[0], session.eval("with_state")[0]
    assert trainable and all("lora_" in n for n in trainable)
    assert with_state == trainable  # AdamW state for the adapters only
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)
    for mine, adam in zip(session.eval("lora_bytes"), session.eval("adam_bytes")):
        assert adam == 2 * mine  # exp_avg and exp_avg_sq of this rank's adapter shards, nothing else


def test_lora_under_fsdp1_is_refused_in_one_line_unless_it_keeps_the_original_parameters(session):
    fsdp = dict(fsdp_version=1, auto_wrap_policy="TRANSFORMER_BASED_WRAP")
    refused = {**fsdp, "use_orig_params": False}
    result = session.run(BUILD + ON_RANKS.format(arch="llama", fsdp=refused, lora=True), output=Silent())
    assert len(result.errors) == 2
    for error in result.errors:
        assert "use_orig_params=True" in str(error) and "fsdp_version=2" in str(error)
    ref_losses, ref_norms = reference("llama", lora=True)
    for losses, norms in sharded(session, "llama", {**fsdp, "use_orig_params": True}, lora=True):
        assert_close(losses, ref_losses, FP32)
        assert_close(norms, ref_norms, FP32)


def test_transformer_wrap_without_block_classes_falls_back_to_size_with_a_warning():
    import warnings

    from torch import nn

    from fsdp_nb import FSDPConfig
    from fsdp_nb.sharding import wrap_units

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        units = wrap_units(model, FSDPConfig(auto_wrap_policy="TRANSFORMER_BASED_WRAP", min_num_params=4000))
    assert units == [model[0], model[2]]  # 4160 parameters each: the size rule's choice
    assert any("no _no_split_modules" in str(w.message) and "SIZE_BASED_WRAP" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="names \\['Nope'\\]"):  # names given but missing still raise
        wrap_units(model, FSDPConfig(auto_wrap_policy="TRANSFORMER_BASED_WRAP", transformer_cls_names_to_wrap=["Nope"]))
