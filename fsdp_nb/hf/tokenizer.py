"""A byte-level BPE tokenizer trained offline, and the path text -> token ids -> blocks for the Trainer.

    tok = train_tokenizer(stdlib_corpus(200_000).decode(), vocab_size=512)
    data = token_blocks(tok, text, block_size=64)   # a ByteBlocks of token ids

Byte-level, as GPT-2's: every string is first written as bytes, each byte one of 256
symbols, so any text (non-ASCII, code, emoji) encodes with no unknown token and
decodes back to itself. BPE then merges frequent pairs up to `vocab_size`. One
special token, `<|endoftext|>`, is the tokenizer's eos, bos and pad: it ends
documents in `token_blocks` and pads prompts in `generate` (always with an attention mask).

Training is deterministic: the same texts and options give the same vocabulary and
merges in any process, so every rank of a session may train its own copy and they agree.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fsdp_nb.data import ByteBlocks

EOS = "<|endoftext|>"
BYTE_ALPHABET = 256  # the byte-level pre-tokenizer's initial symbols: one per byte value


def require_hf(what: str):
    """`(tokenizers, transformers)`, or a one-line ImportError naming the extra to install."""
    try:
        import tokenizers
        import transformers
    except ImportError as e:
        raise ImportError(f"{what} needs the hf extra ({e.name} is missing): pip install fsdp_nb[hf]") from None
    return tokenizers, transformers


def _texts(texts: str | Iterable[str]) -> list[str]:
    """`texts` as a list of strings: a single str is one text; bytes are refused (decode them first)."""
    if isinstance(texts, (bytes, bytearray)):
        raise ValueError(
            "train_tokenizer: texts are bytes; decode them first, e.g. texts=stdlib_corpus().decode('utf-8')"
        )
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"train_tokenizer: texts must be strings, got a {type(bad).__name__}: {bad!r:.60}")
    if not any(texts):
        raise ValueError("train_tokenizer: texts are empty; give at least one non-empty string")
    return texts


def train_tokenizer(
    texts: str | Iterable[str],
    *,
    vocab_size: int = 1024,
    min_frequency: int = 2,
    special_tokens: tuple[str, ...] = (EOS,),
):
    """A byte-level BPE tokenizer trained on `texts`, as a `transformers.PreTrainedTokenizerFast`.

    `texts` is an iterable of strings (documents, lines or chunks), or a single str,
    taken as one text. `vocab_size` counts the 256 byte symbols and the special tokens;
    a small corpus may stop short of it (`len(tokenizer)` is the real size, the one a
    model's embedding needs). The first of `special_tokens` is eos, bos and pad.

    The result saves with `save_pretrained(dir)` and loads back with
    `AutoTokenizer.from_pretrained(dir)`, encoding identically, offline.
    """
    tokenizers, transformers = require_hf("train_tokenizer")
    specials = tuple(special_tokens)
    if not specials or not all(isinstance(s, str) and s for s in specials) or len(set(specials)) != len(specials):
        raise ValueError(
            f"train_tokenizer: special_tokens={special_tokens!r} must be distinct non-empty strings, "
            f"the first one the eos token (e.g. ({EOS!r},))"
        )
    smallest = BYTE_ALPHABET + len(specials)
    if not isinstance(vocab_size, int) or vocab_size < smallest:
        raise ValueError(
            f"train_tokenizer: vocab_size={vocab_size!r} is too small: the {BYTE_ALPHABET} byte symbols and "
            f"{len(specials)} special token(s) need at least {smallest}"
        )
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"train_tokenizer: min_frequency={min_frequency!r} must be a positive int")
    texts = _texts(texts)

    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE())
    # add_prefix_space=False: a text encodes as it is, so decode(encode(x)) == x exactly
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(specials),  # ids 0.. in this order, before the bytes
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the corpus or not
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    eos = specials[0]
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=eos,
        bos_token=eos,
        pad_token=eos,
        extra_special_tokens=list(specials[1:]) or None,
    )


def token_ids(tokenizer, text: str | list[str]) -> torch.Tensor:
    """`text` (or documents joined by the eos token) as one `(N,)` int64 tensor of token ids."""
    docs = [text] if isinstance(text, str) else list(text)
    if not docs or not all(isinstance(d, str) for d in docs):
        raise ValueError("token_blocks: text must be a str or a non-empty list of str")
    eos = tokenizer.eos_token_id
    if len(docs) > 1 and eos is None:
        raise ValueError("token_blocks: the tokenizer has no eos token to join documents with; set tokenizer.eos_token")
    # verbose=False: a corpus is longer than model_max_length on purpose; blocks cut it, so no warning
    encoded = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    ids: list[int] = []
    for i, doc in enumerate(encoded):
        ids.extend(([eos] if i else []) + doc)
    tokens = torch.tensor(ids, dtype=torch.long)  # (N,)
    if tokens.numel() and int(tokens.max()) >= len(tokenizer):
        raise ValueError(f"token_blocks: token id {int(tokens.max())} is outside the vocabulary of {len(tokenizer)}")
    return tokens


def token_blocks(tokenizer, text: str | list[str], block_size: int) -> ByteBlocks:
    """Next-token examples for the Trainer: `text` tokenized, cut into blocks of `block_size`.

    A list of documents is joined with the eos token between them, so the model sees
    where one ends. Item i is `(x, y)`, both `(block_size,)` int64, `y` the ids after
    `x`'s; `.tokens` holds all ids. The model's vocabulary must be `len(tokenizer)`.
    """
    return ByteBlocks(token_ids(tokenizer, text), block_size)
