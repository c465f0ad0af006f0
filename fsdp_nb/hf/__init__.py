"""Hugging Face models in fsdp_nb: Transformers causal LMs and PEFT adapters, offline.

Needs the `hf` extra (`pip install fsdp_nb[hf]`: transformers, peft, tokenizers).
Nothing here touches the network: models come from configs or local directories,
tokenizers are trained on text at hand.

- `train_tokenizer(texts, vocab_size=...)`: a byte-level BPE, as a `PreTrainedTokenizerFast`
- `token_blocks(tokenizer, text, block_size)`: text -> token ids -> fixed-length blocks for the Trainer
- `load_pretrained(path, fsdp_config)`: a `save_pretrained` directory, ready for `shard()`
- `save_adapter(model, path)`: a sharded PEFT model's adapter, in PEFT's own format
- `generate(model, tokenizer, prompts, ...)`: sampling from a sharded FSDP2 model, on every rank
- `causal_lm(model)`: the Transformers model inside a wrapper (FSDP1, PEFT), or None

`save_checkpoint` records a Transformers model's config (and a tokenizer, if given);
`merge_weights` then writes a directory that `AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

from fsdp_nb._lazy import lazy_exports

_LAZY = {
    "causal_lm": "fsdp_nb.hf.detect",
    "peft_model_of": "fsdp_nb.hf.detect",
    "train_tokenizer": "fsdp_nb.hf.tokenizer",
    "token_blocks": "fsdp_nb.hf.tokenizer",
    "generate": "fsdp_nb.hf.generate",
    "load_pretrained": "fsdp_nb.hf.pretrained",
    "save_adapter": "fsdp_nb.hf.adapter",
}
__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
