"""Text in and out of a Hugging Face model: a byte-level BPE trained offline, token blocks for the
Trainer, and `generate` on a sharded tiny Llama on both ranks of the shared session.

References run in the pytest process (no process group, the model unsharded); the ranks build the
same model from the same seed and generate from it sharded. Prompts differ per rank, in number and
length, and one rank may meet eos early: every rank must come back, with the reference's text.
"""

from __future__ import annotations

import hashlib
import sys
import textwrap
from functools import cache

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from fsdp_nb.data import stdlib_corpus  # noqa: E402
from fsdp_nb.hf import generate, token_blocks, train_tokenizer  # noqa: E402
from fsdp_nb.session.output import Silent  # noqa: E402

pytestmark = pytest.mark.timeout(60)

CORPUS_BYTES = 150_000
VOCAB = 512
MAX_NEW = 8
# What text a byte-level tokenizer must give back unchanged: accents, CJK, emoji (4 UTF-8 bytes),
# leading spaces, tabs, CRLF, a control character, and characters no Python source holds.
SAMPLES = [
    "def main(argv):\n\treturn 0\n",
    "  leading spaces, trailing space ",
    "naïve café, Straße, ÆØÅ",
    "日本語のテキスト 🙂🚀 ∑∫√",
    "line one\r\nline two\x00\x07 end",
    "",
]
PROMPTS = {0: ["def main(", "import os\nimport sys\n\nclass Reader"], 1: ["x = 1"]}  # per rank: 2 vs 1, short vs long

# Run as it is on the ranks and in the pytest process, so both build the very same model.
TINY_LLAMA = """
def tiny_llama(vocab_size):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)
"""

RANK_SETUP = f"""
import datetime, hashlib, warnings
warnings.filterwarnings("ignore")
from torch.distributed.device_mesh import DeviceMesh
from fsdp_nb import FSDPConfig, shard
from fsdp_nb.data import stdlib_corpus
from fsdp_nb.hf import generate, train_tokenizer
tok = train_tokenizer(stdlib_corpus({CORPUS_BYTES}).decode().splitlines(keepends=True), vocab_size={VOCAB})
tok_digest = hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()
# FSDP2's all-gathers on a group with a short timeout: a rank left alone in one fails in
# seconds, instead of the session's minute (the hang these tests look for). Made once per session.
if "short_mesh" not in globals():
    short_mesh = DeviceMesh.from_group(dist.new_group(timeout=datetime.timedelta(seconds=20)), "cpu")
{TINY_LLAMA}
def sharded_llama(version):
    config = FSDPConfig(fsdp_version=version, auto_wrap_policy="TRANSFORMER_BASED_WRAP")
    return shard(tiny_llama(len(tok)), config, mesh=short_mesh if version == 2 else None)
"""


@cache
def corpus_lines() -> tuple[str, ...]:
    return tuple(stdlib_corpus(CORPUS_BYTES).decode().splitlines(keepends=True))


@cache
def tok():
    return train_tokenizer(corpus_lines(), vocab_size=VOCAB)


def digest(tokenizer) -> str:
    """The whole trained tokenizer (vocabulary, merges, specials, pre-tokenizer), as one hash."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


@cache
def reference_llama():
    namespace = {"torch": torch}
    exec(TINY_LLAMA, namespace)
    return namespace["tiny_llama"](len(tok()))


def new_ids(prompt: str) -> list[int]:
    """The unsharded model's greedy continuation of one prompt, as token ids."""
    ids = torch.tensor([tok()(prompt)["input_ids"]])  # (1, T)
    out = reference_llama().generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=MAX_NEW,
        do_sample=False,
        eos_token_id=tok().eos_token_id,
        pad_token_id=tok().pad_token_id,
    )  # (1, T + new)
    return out[0, ids.shape[1] :].tolist()


def run(session, source: str):
    return session.run(textwrap.dedent(source), output=Silent()).raise_errors()


@pytest.fixture
def ranks(session):
    """The shared session with the tokenizer, the model builder and a short-timeout mesh on each rank.
    Bound again for every test (a tenth of a second): other test files share the ranks' namespace."""
    run(session, RANK_SETUP)
    return session


# ---- the tokenizer --------------------------------------------------------------------------


def test_the_tokenizer_round_trips_through_save_pretrained(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok().save_pretrained(tmp_path)
    texts = [*SAMPLES, "".join(corpus_lines()[:200])]
    for loaded in (PreTrainedTokenizerFast.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert [loaded.encode(t) for t in texts] == [tok().encode(t) for t in texts]
        assert (loaded.eos_token, loaded.bos_token, loaded.pad_token) == ("<|endoftext|>",) * 3
        assert (loaded.eos_token_id, loaded.pad_token_id, len(loaded)) == (tok().eos_token_id, 0, len(tok()))
        assert digest(loaded) == digest(tok())


def test_training_is_deterministic_here_and_on_the_ranks(ranks):
    again = train_tokenizer(list(corpus_lines()), vocab_size=VOCAB)
    assert digest(again) == digest(tok())
    # the ranks are other processes (another hash seed): each trains its own copy, and all agree
    assert ranks.eval("tok_digest") == [digest(tok())] * 2


def test_decode_gives_back_any_text_and_merges_shorten_it():
    for text in SAMPLES:
        ids = tok().encode(text)
        assert tok().decode(ids) == text
        assert all(0 <= i < len(tok()) for i in ids)
    assert len(tok()) == VOCAB  # 150 KB of Python reach the asked size
    code = "".join(corpus_lines()[:200])
    assert len(tok().encode(code)) < 0.7 * len(code.encode())  # BPE merges: far fewer ids than bytes


def test_a_single_string_is_one_text():
    text = "".join(corpus_lines()[:300])
    assert digest(train_tokenizer(text, vocab_size=300)) == digest(train_tokenizer([text], vocab_size=300))


@pytest.mark.parametrize(
    "texts, options, message",
    [
        (["abc"], dict(vocab_size=256), "vocab_size=256 is too small"),
        (["abc"], dict(vocab_size=258, special_tokens=("<a>", "<b>", "<c>")), "need at least 259"),
        ([], {}, "texts are empty"),
        (["", ""], {}, "texts are empty"),
        (b"abc", {}, "decode them first"),
        (["abc", 3], {}, "must be strings, got a int"),
        (["abc"], dict(special_tokens=()), "must be distinct non-empty strings"),
        (["abc"], dict(min_frequency=0), "min_frequency=0 must be a positive int"),
    ],
)
def test_bad_arguments_are_one_line_errors(texts, options, message):
    with pytest.raises(ValueError, match=message) as caught:
        train_tokenizer(texts, **options)
    assert "\n" not in str(caught.value)


def test_vocab_of_the_bytes_and_specials_alone_is_allowed():
    small = train_tokenizer(["abc abc abc"], vocab_size=257)
    assert len(small) == 257 and small.decode(small.encode("héllo")) == "héllo"


def test_a_missing_extra_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now fails
    with pytest.raises(ImportError, match=r"pip install fsdp_nb\[hf\]"):
        train_tokenizer(["abc"])


# ---- token blocks ---------------------------------------------------------------------------


def test_token_blocks_are_shifted_views_of_the_joined_documents():
    docs = ["".join(corpus_lines()[:80]), "".join(corpus_lines()[80:150])]
    data = token_blocks(tok(), docs, 16)
    ids = data.tokens
    expected = tok().encode(docs[0]) + [tok().eos_token_id] + tok().encode(docs[1])
    assert ids.dtype == torch.int64 and ids.tolist() == expected
    assert tok().decode(ids.tolist()) == "<|endoftext|>".join(docs)
    assert len(data) == (len(expected) - 1) // 16
    for i in (0, 1, len(data) - 1):
        x, y = data[i]
        assert x.shape == y.shape == (16,) and x.dtype == torch.int64
        assert x.tolist() == expected[i * 16 : i * 16 + 16]
        assert y.tolist() == expected[i * 16 + 1 : i * 16 + 17]  # y: x moved one token on
    assert int(ids.max()) < len(tok())


def test_token_blocks_errors():
    with pytest.raises(ValueError, match="fewer than one block"):
        token_blocks(tok(), "short", 64)
    with pytest.raises(ValueError, match="non-empty list of str"):
        token_blocks(tok(), [], 4)


# ---- generate on the ranks ------------------------------------------------------------------


@pytest.mark.parametrize("version", [2, 1])
def test_generate_on_both_ranks_matches_the_unsharded_model(ranks, version):
    """Rank 0 batches two prompts of different lengths (left padding), rank 1 decodes one: both finish,
    with the text the unsharded model writes, and the model comes back in its training mode."""
    expected = {
        r: generate(reference_llama(), tok(), prompts, max_new_tokens=MAX_NEW) for r, prompts in PROMPTS.items()
    }
    assert expected[0] == [tok().decode(new_ids(p), skip_special_tokens=True) for p in PROMPTS[0]]  # padding is exact
    ranks.push(prompts_by_rank=PROMPTS)
    run(ranks, f"model = sharded_llama({version})\nmodel.train()")
    run(ranks, f"texts = generate(model, tok, prompts_by_rank[rank], max_new_tokens={MAX_NEW})")
    assert ranks.eval("texts") == [expected[0], expected[1]]
    assert ranks.eval("model.training and all(m.training for m in model.modules())") == [True, True]
    if version == 2:  # the root, kept gathered after forward for a backward, is sharded again
        assert ranks.eval("isinstance(model.model.embed_tokens.weight, torch.distributed.tensor.DTensor)") == [True] * 2


def test_an_eos_met_early_on_one_rank_does_not_hang(ranks):
    """Rank 0 stops after a few tokens, rank 1 decodes all of them: without synced_gpus rank 1
    would wait alone in its next all-gather (on the 20 s mesh: an error, not a pass)."""
    prompt = {0: "def main(", 1: "import os\nimport sys\n\nclass Reader"}
    ref = {r: new_ids(p) for r, p in prompt.items()}
    eos = {0: ref[0][2], 1: tok().eos_token_id}  # rank 0's eos: its third token
    stop = ref[0].index(eos[0]) + 1
    assert stop < MAX_NEW and tok().eos_token_id not in ref[1]  # the case is real: one rank stops early
    ranks.push(prompt_by_rank=prompt, eos_by_rank=eos)
    run(ranks, "model = sharded_llama(2)")
    run(
        ranks,
        f"text = generate(model, tok, prompt_by_rank[rank], max_new_tokens={MAX_NEW}, eos_token_id=eos_by_rank[rank])",
    )
    assert ranks.eval("text") == [[tok().decode(ref[0][:stop])], [tok().decode(ref[1])]]


@pytest.mark.parametrize("version", [2, 1])
def test_generate_with_a_peft_model_then_train(ranks, version):
    """A PEFT model puts the FSDP root around what HF's loop calls: the root's parameters must be
    gathered for it, and a training step afterwards must still find the root where FSDP put it."""
    pytest.importorskip("peft")
    lora = textwrap.dedent("""
        from peft import LoraConfig, get_peft_model
        def lora_llama():
            base = tiny_llama(len(tok))
            torch.manual_seed(1)
            config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
            return get_peft_model(base, config)
    """)
    ranks.push(prompts_by_rank=PROMPTS)
    run(ranks, lora)
    run(ranks, f"expected = generate(lora_llama(), tok, prompts_by_rank[rank], max_new_tokens={MAX_NEW})")
    config = f"FSDPConfig(fsdp_version={version}, auto_wrap_policy='TRANSFORMER_BASED_WRAP')"
    run(ranks, f"peft_model = shard(lora_llama(), {config}, mesh=short_mesh if {version} == 2 else None)")
    run(ranks, f"texts = generate(peft_model, tok, prompts_by_rank[rank], max_new_tokens={MAX_NEW})")
    assert ranks.eval("texts == expected") == [True, True]
    base = f"generate(tiny_llama(len(tok)), tok, prompts_by_rank[rank], max_new_tokens={MAX_NEW})"
    assert ranks.eval(f"texts != {base}") == [True, True]  # the adapters took part
    run(ranks, "ids = torch.tensor([tok.encode('def f(x): return x')])  # (1, T)")
    run(ranks, "ref_loss = lora_llama()(input_ids=ids, labels=ids).loss.item()")
    run(ranks, "loss = peft_model(input_ids=ids, labels=ids).loss\nloss.backward()")
    for loss, ref_loss in ranks.eval("(loss.item(), ref_loss)"):
        assert abs(loss - ref_loss) < 1e-5


def test_generate_refuses_what_it_cannot_run(ranks):
    run(ranks, "model = sharded_llama(2)")
    errors = ranks.run("generate(torch.nn.Linear(2, 2), tok, 'x')", output=Silent()).errors
    assert [e.type for _, e in errors] == ["ValueError", "ValueError"]
    assert "not a Transformers causal LM" in errors[0][1].message
    # a prompt that is bad on rank 1 only: rank 1 says why, rank 0 stops too instead of waiting alone
    errors = ranks.run("generate(model, tok, '' if rank else 'x', max_new_tokens=2)", output=Silent()).errors
    assert sorted((r, e.type) for r, e in errors) == [(0, "PeerFailure"), (1, "ValueError")]
    assert ranks.eval(
        "generate(model, tok, 'x', max_new_tokens=2) == generate(model, tok, ['x'], max_new_tokens=2)"
    ) == [
        True,
        True,
    ]
