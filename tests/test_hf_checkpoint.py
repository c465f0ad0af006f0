"""Hugging Face checkpoints on real ranks: merged directories `from_pretrained` loads, LoRA folded as peft
folds it, adapters in PEFT's format, `load_pretrained` with cpu_ram_efficient_loading.

A tiny Llama is trained one step on 2 ranks, so its weights are not those of its init;
every LoRA B starts random, so folding the adapters changes the weights and a wrong fold
cannot pass. References are Transformers and PEFT themselves, in this process:
`from_pretrained`, `save_pretrained`, `merge_and_unload`, `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytestmark = pytest.mark.timeout(120)

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from fsdp_nb.checkpoint import CheckpointError, inspect, merge_weights, save_checkpoint  # noqa: E402

TINY = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
PROBE = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(7))

# Rank-side helpers; TINY, LORA and PROBE are pushed, so both sides build the same things.
HELPERS = """
import warnings
warnings.filterwarnings("ignore")
import peft
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from fsdp_nb import FSDPConfig, merge_weights, shard, save_checkpoint
from fsdp_nb.hf import load_pretrained, save_adapter

def llama(tie=False, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tie))

def lora(model):
    model = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B starts at zero: folding it would change nothing, so a wrong fold would pass
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model

def step(model):  # one AdamW step: the trained weights are not the init's
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(10 + rank))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    return opt

def logits(model):
    with torch.no_grad():
        return model(input_ids=PROBE).logits

def full(model):  # every tensor gathered, by name (cpu_offload=False: the safe path for FSDP1 on CPU)
    options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    return {k: v.clone() for k, v in get_model_state_dict(model, options=options).items()}
"""


def run(session, cell: str):
    from fsdp_nb.session.output import Silent

    session.run(textwrap.dedent(cell), output=Silent()).raise_errors()


@pytest.fixture
def ranks(session, tmp_path):
    session.push(root=str(tmp_path), TINY=TINY, LORA=LORA, PROBE=PROBE)
    run(session, HELPERS)
    return session


def llama(tie=False, seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tie))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits


def reference_keys(tmp_path, tie: bool) -> set[str]:
    """The keys Transformers' own `save_pretrained` writes for this architecture (tied weights once)."""
    llama(tie).save_pretrained(tmp_path / f"reference-{tie}")
    return set(load_file(str(tmp_path / f"reference-{tie}" / "model.safetensors")))


def tiny_tokenizer(directory):
    """A byte-level BPE trained here, saved with `save_pretrained`: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    tokenizer.save_pretrained(str(directory))
    return tokenizer


# (fsdp_version, state_dict_type, tied embeddings, use_orig_params, activation_checkpointing, async_save):
# every version meets both kinds, both tyings, and activation checkpointing's wrapper names.
CASES = [
    (1, "SHARDED_STATE_DICT", True, False, False, True),
    (1, "FULL_STATE_DICT", False, True, True, False),
    (2, "SHARDED_STATE_DICT", False, True, True, True),
    (2, "FULL_STATE_DICT", True, True, False, False),
]


@pytest.mark.parametrize("version, kind, tie, uop, ac, asynchronous", CASES)
def test_merged_checkpoint_loads_with_from_pretrained_and_gives_the_trained_logits(
    ranks, tmp_path, version, kind, tie, uop, ac, asynchronous
):
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    run(
        ranks,
        f"""
        config = FSDPConfig(fsdp_version={version}, use_orig_params={uop}, activation_checkpointing={ac},
                            auto_wrap_policy="TRANSFORMER_BASED_WRAP")
        model = shard(llama(tie={tie}), config)
        opt = step(model)
        pending = save_checkpoint(model, opt, f"{{root}}/ck", state_dict_type="{kind}", async_save={asynchronous},
                                  tokenizer=AutoTokenizer.from_pretrained(f"{{root}}/tok"))
        out = logits(model)
        if pending is not None:
            pending.wait()
        """,
    )
    manifest = inspect(tmp_path / "ck")
    assert manifest.hf["config"]["architectures"] == [LlamaForCausalLM.__name__]  # not FSDP's subclass name
    assert manifest.has_optimizer and "peft" not in manifest.hf
    assert "tokenizer/tokenizer.json" in manifest.sha256  # checksummed like the weights
    merged = merge_weights(tmp_path / "ck", tmp_path / "merged")
    assert merged == tmp_path / "merged"
    assert set(load_file(str(merged / "model.safetensors"))) == reference_keys(tmp_path, tie)
    loaded = AutoModelForCausalLM.from_pretrained(merged, local_files_only=True)
    assert type(loaded) is LlamaForCausalLM and loaded.dtype == torch.float32
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    torch.testing.assert_close(logits(loaded), ranks.eval("out")[0], rtol=0, atol=1e-5)
    assert sorted(p.name for p in merged.iterdir()) == sorted(
        {"config.json", "generation_config.json", "model.safetensors"} | {p.name for p in (tmp_path / "tok").iterdir()}
    )
    text = "the lazy fox jumps"
    assert AutoTokenizer.from_pretrained(merged).encode(text) == tokenizer.encode(text)


# activation checkpointing renames the modules that PEFT walks (FSDP1's wrappers do too)
@pytest.mark.parametrize("version, kind, ac", [(2, "SHARDED_STATE_DICT", True), (1, "FULL_STATE_DICT", False)])
def test_lora_merges_as_peft_folds_it_and_its_adapter_loads_in_peft(ranks, tmp_path, version, kind, ac):
    import peft

    run(
        ranks,
        f"""
        config = FSDPConfig(fsdp_version={version}, use_orig_params=True, auto_wrap_policy="TRANSFORMER_BASED_WRAP",
                            transformer_cls_names_to_wrap=["LlamaDecoderLayer"], activation_checkpointing={ac})
        model = shard(lora(llama()), config)
        opt = step(model)
        save_checkpoint(model, opt, f"{{root}}/ck", state_dict_type="{kind}")
        save_adapter(model, f"{{root}}/adapter")
        out, trained = logits(model), full(model)
        if rank == 0:  # on one rank of the live job, while rank 1 waits for the next cell
            merge_weights(f"{{root}}/ck", f"{{root}}/merged-on-rank0")
        """,
    )
    out, trained = ranks.eval("(out, trained)")[0]
    assert inspect(tmp_path / "ck").hf["peft"]["default"]["target_modules"] == sorted(LORA["target_modules"])

    # the reference: real peft, in this process, on the very weights the ranks trained
    reference = peft.get_peft_model(llama(), peft.LoraConfig(**LORA))
    reference.load_state_dict(trained, strict=True)
    torch.testing.assert_close(logits(reference), out, rtol=0, atol=1e-5)
    reference.save_pretrained(tmp_path / "reference-adapter")  # before merge_and_unload changes it
    folded = reference.merge_and_unload().state_dict()

    merged = merge_weights(tmp_path / "ck", tmp_path / "merged")
    weights = load_file(str(merged / "model.safetensors"))
    assert set(weights) == reference_keys(tmp_path, tie=False)  # the base architecture's keys: no lora_, no base_layer
    changed = 0
    for key, value in weights.items():
        torch.testing.assert_close(value, folded[key], rtol=0, atol=1e-6, msg=key)
        changed += not torch.equal(value, llama().state_dict()[key])
    assert changed >= 2 * 2  # q_proj and v_proj of both layers moved: the adapters were folded in
    on_rank0 = load_file(str(tmp_path / "merged-on-rank0" / "model.safetensors"))
    assert set(on_rank0) == set(weights) and all(torch.equal(on_rank0[k], weights[k]) for k in weights)
    loaded = AutoModelForCausalLM.from_pretrained(merged, local_files_only=True)
    torch.testing.assert_close(logits(loaded), out, rtol=0, atol=1e-5)

    adapter = tmp_path / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    assert set(load_file(str(adapter / "adapter_model.safetensors"))) == set(
        load_file(str(tmp_path / "reference-adapter" / "adapter_model.safetensors"))
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == LORA["r"] and sorted(config["target_modules"]) == sorted(LORA["target_modules"])
    restored = peft.PeftModel.from_pretrained(llama(), adapter)
    torch.testing.assert_close(logits(restored), out, rtol=0, atol=1e-5)
    assert not list(tmp_path.glob("**/.fsdp_nb-tmp-*"))  # every temporary directory is gone


@pytest.mark.parametrize("version", [1, 2])
def test_load_pretrained_with_ram_efficient_loading_fills_the_shards_from_rank0(ranks, tmp_path, version):
    saved = llama(tie=True, seed=5)
    saved.save_pretrained(tmp_path / "pretrained")
    llama().to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    run(
        ranks,
        f"""
        config = FSDPConfig(fsdp_version={version}, cpu_ram_efficient_loading=True, use_orig_params=False,
                            auto_wrap_policy="TRANSFORMER_BASED_WRAP")
        built = load_pretrained(f"{{root}}/pretrained", config)
        held = sorted({{t.device.type for t in list(built.parameters()) + list(built.buffers())}})
        model = shard(built, config)
        out, got = logits(model), full(model)
        every = load_pretrained(f"{{root}}/bf16", FSDPConfig(fsdp_version={version}))  # without: every rank reads
        every = (sorted({{t.device.type for t in every.parameters()}}), every.dtype)
        """,
    )
    assert ranks.eval("held") == [["cpu"], ["meta"]]  # rank 1 holds no storage until shard()
    assert ranks.eval("every") == [(["cpu"], torch.float32)] * 2  # fp32 by default, whatever the files hold
    files = load_file(str(tmp_path / "pretrained" / "model.safetensors"))
    for got in ranks.eval("got"):
        for key, value in files.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    expected = logits(saved)
    for out in ranks.eval("out"):
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_hf_errors_are_one_line_on_every_rank(ranks, tmp_path):
    from fsdp_nb.phases import PeerFailure

    llama().save_pretrained(tmp_path / "pretrained")
    path = "f'{root}/missing' if rank == 1 else f'{root}/pretrained'"  # rank 1 alone cannot read it
    cell = f"load_pretrained({path}, FSDPConfig(cpu_ram_efficient_loading=True))"
    errors = dict(ranks.run(cell).errors)
    assert errors[1].type == "FileNotFoundError" and f"{tmp_path / 'missing'} does not exist" in errors[1].message
    assert errors[0].type == PeerFailure.__name__ and "rank 1 failed with FileNotFoundError" in errors[0].message
    errors = dict(ranks.run("save_adapter(llama(), f'{root}/adapter')").errors)
    for rank in (0, 1):
        assert errors[rank].type == "ValueError" and "LlamaForCausalLM is not a PEFT model" in errors[rank].message


def test_manifests_of_other_models_are_unchanged_and_a_damaged_tokenizer_stops_the_merge(tmp_path):
    """In one process: no `hf` entry for a plain module (older manifests read back as None); its merge
    is today's one file, with a tokenizer's files beside it if one was saved."""
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    save_checkpoint(torch.nn.Linear(3, 2), None, tmp_path / "plain", tokenizer=tokenizer)
    assert "hf" not in json.loads((tmp_path / "plain" / "fsdp_nb_checkpoint.json").read_text())
    assert inspect(tmp_path / "plain").hf is None
    written = merge_weights(tmp_path / "plain", tmp_path / "plain-merged")
    assert written == tmp_path / "plain-merged" / "model.safetensors"
    assert sorted(p.name for p in (tmp_path / "plain-merged").iterdir()) == sorted(
        ["model.safetensors"] + [p.name for p in (tmp_path / "tok").iterdir()]
    )
    with pytest.raises(CheckpointError, match="rank 0: TypeError: tokenizer=object has no save_pretrained"):
        save_checkpoint(torch.nn.Linear(3, 2), None, tmp_path / "bad", tokenizer=object())
    assert not (tmp_path / "bad").exists()
    save_checkpoint(llama(), None, tmp_path / "ck", tokenizer=tokenizer)
    file = tmp_path / "ck" / "tokenizer" / "tokenizer.json"
    file.write_bytes(file.read_bytes().replace(b"fox", b"cat", 1))
    with pytest.raises(CheckpointError, match="tokenizer/tokenizer.json does not match the checksum"):
        merge_weights(tmp_path / "ck", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_cli_merge_weights_writes_a_from_pretrained_directory(tmp_path, capsys):
    from fsdp_nb import cli

    trained = llama(seed=2)
    save_checkpoint(trained, None, tmp_path / "ck", state_dict_type="FULL_STATE_DICT")
    assert cli.main(["merge-weights", str(tmp_path / "ck"), str(tmp_path / "out")]) == 0
    assert str(tmp_path / "out") in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    torch.testing.assert_close(logits(loaded), logits(trained), rtol=0, atol=1e-5)
    # again, as pytorch_model.bin into the same directory: the safetensors file, which from_pretrained
    # would read first, does not stay behind
    assert cli.main(["merge-weights", str(tmp_path / "ck"), str(tmp_path / "out"), "--unsafe_serialization"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "generation_config.json", "pytorch_model.bin"
    ]  # fmt: skip
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    torch.testing.assert_close(logits(loaded), logits(trained), rtol=0, atol=1e-5)


def test_a_tied_weight_saved_under_one_name_is_written_once_under_the_input_name(tmp_path):
    """In one process: a state dict that names a tied tensor once, under either name, gives the file
    Transformers' own `save_pretrained` writes; untied weights of a config that says tied keep both."""
    from fsdp_nb.hf.export import pretrained_state, record

    tied = llama(tie=True, seed=4)
    state = tied.state_dict()
    for dropped in ("lm_head.weight", "model.embed_tokens.weight"):
        (tmp_path / dropped).mkdir()
        written = pretrained_state({k: v for k, v in state.items() if k != dropped}, record(tied), tmp_path / dropped)
        assert set(written) == reference_keys(tmp_path, tie=True)
        assert torch.equal(written["model.embed_tokens.weight"], state["model.embed_tokens.weight"])
    untied = dict(state, **{"lm_head.weight": state["lm_head.weight"] + 1})
    (tmp_path / "untied").mkdir()
    assert set(pretrained_state(untied, record(tied), tmp_path / "untied")) == set(state)
