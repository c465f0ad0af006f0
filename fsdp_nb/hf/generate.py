"""Text from a sharded Transformers causal LM, on every rank: `generate(model, tokenizer, prompts)`.

    %%fsdp
    texts = generate(model, tok, ["def main(", "import"], max_new_tokens=20)   # new text only

[Note: every rank decodes every step]
A sharded model's forward is a collective: each FSDP unit all-gathers its parameters
from every rank. HF's decoding loop runs one forward per new token and stops when all
of a rank's sequences have met eos. If ranks stopped on their own, a rank whose prompts
end early would leave the loop while the others wait in their next all-gather until the
process-group timeout. `synced_gpus=True` makes the loop all-reduce a "finished" flag
before each step (on the inputs' device: a CPU tensor under gloo) and go on with dummy
forwards until every rank is done, so all ranks run the same number of forwards.
Different prompts per rank, of different lengths, are fine: the all-gathers move
parameters, whose shapes do not depend on the input, and the KV cache holds activations.
transformers 5 turns synced_gpus on by itself only for modules torch marked as FSDP's
(`_is_fsdp_managed_module`); fsdp_nb passes it whenever there is more than one rank.

[Note: the root's parameters]
HF's loop calls the causal LM's own `__call__`. With FSDP2 on the causal LM itself, that
is the root, and its hooks gather and free as in training. But when the root is a
wrapper around it, the root's hooks never run and its parameters (embeddings, final
norm, head: what no layer unit claimed) stay sharded: FSDP1's root is always such a
wrapper ("'weight' must be 2-D" from the embedding), and so is an FSDP2 root on a PEFT
model ("mixed torch.Tensor and DTensor"). fsdp_nb then gathers the root's own parameters
for the whole loop, as an FSDP1 forward keeps them anyway; the layer units still gather
one at a time. FSDP1 has a public call for it (`summon_full_params(recurse=False)`).
FSDP2's `unshard()` gathers, but the root must also have run a forward once: the first
FSDP2 state to run forward becomes the root, and a layer that took that role would make
the next training step fail ("requires running forward through the root module first").
So a one-token forward through the root comes first.
After the loop every FSDP2 unit is resharded: an FSDP2 root keeps its parameters gathered
after forward for the backward that follows in training, and generation has none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from fsdp_nb.hf.detect import causal_lm, peft_model_of
from fsdp_nb.hf.tokenizer import require_hf
from fsdp_nb.phases import fail_together


def _prompts(prompts: str | list[str]) -> list[str]:
    """A str is one prompt; a list of str is a batch."""
    batch = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(batch, (list, tuple)) or not batch or not all(isinstance(p, str) for p in batch):
        raise ValueError(f"generate: prompts={prompts!r:.80} must be a str or a non-empty list of str")
    return list(batch)


def _generator(model: nn.Module) -> nn.Module:
    """What `.generate` is called on: the PEFT model if there is one (its adapters apply), else the causal LM."""
    peft = peft_model_of(model)
    if peft is not None:
        return peft
    lm = causal_lm(model)
    if lm is None or not lm.can_generate():
        raise ValueError(
            f"generate: model is a {type(model).__name__}, not a Transformers causal LM (or a PEFT model around "
            f"one) that can generate; build it with AutoModelForCausalLM or a *ForCausalLM class"
        )
    return lm


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("generate: the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    return pad


def left_padded(tokenizer, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)`, both `(B, T)`: prompts padded on the left, so that every
    row's last position is its last prompt token, where decoding appends."""
    rows = tokenizer(prompts)["input_ids"]
    empty = [i for i, row in enumerate(rows) if not row]
    if empty:
        raise ValueError(f"generate: prompt {empty[0]} encodes to no tokens; give it some text")
    T = max(len(row) for row in rows)
    ids = torch.full((len(rows), T), _pad_id(tokenizer), dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T): 1 on prompt tokens
    for i, row in enumerate(rows):
        ids[i, T - len(row) :] = torch.tensor(row)  # row i fills columns [T - len, T)
        mask[i, T - len(row) :] = 1
    return ids.to(device), mask.to(device)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """`model.eval()` inside the block (no dropout while decoding); afterwards each module's own
    train/eval flag as it was, not one flag for all."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def root_gathered(model: nn.Module, called: nn.Module, input_ids: torch.Tensor) -> Iterator[None]:
    """The FSDP root's own parameters gathered for the whole loop, when HF's loop calls a module
    inside the root (`called`) and so skips the root's forward hooks [Note: the root's parameters]."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(model, FSDP):  # FSDP1: always a wrapper around what generate calls
        with FSDP.summon_full_params(model, recurse=False, writeback=False):  # read-only, this unit only
            yield
    elif isinstance(model, FSDPModule) and called is not model:  # FSDP2 around a PEFT model
        model(input_ids=input_ids[:, -1:])  # (B, 1): the last column is a real token in every row
        model.unshard()  # not recursive: the root's group; the layers gather in their own hooks
        yield
    else:  # FSDP2 on the causal LM itself, or no FSDP: its own hooks do it
        yield


def reshard_fsdp2(model: nn.Module) -> None:
    """Free what FSDP2 units left gathered after forward (the root, or every unit with
    reshard_after_forward=False): they wait for a backward, and generation has none."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def generate(
    model: nn.Module,
    tokenizer,
    prompts: str | list[str],
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    **kwargs,
) -> list[str]:
    """The text `model` writes after each prompt: a list of str, one per prompt, the new text only.

    Call it on every rank of the session with the model sharded there (FSDP2, FSDP1, a
    PEFT model, or unsharded); each rank may pass its own prompts, of any length, and
    gets its own continuations back. Prompts are left-padded into one batch with an
    attention mask. Decoding stops at the tokenizer's eos (special tokens are left out
    of the text) or after `max_new_tokens`. `do_sample=False` is greedy; with sampling,
    seed each rank (`torch.manual_seed`) to choose what it draws. Other keyword arguments
    go to HF's `generate` (`temperature`, `top_k`, `eos_token_id`, ...). The model runs in
    eval mode and without autograd; each module's train/eval flag is restored afterwards,
    and FSDP2's parameters are sharded again. Under FSDP1, and FSDP2 around a PEFT model,
    the root unit's own parameters stay gathered during the call [Note: the root's parameters].
    """
    require_hf("generate")
    # Local checks that may fail on one rank only (its prompts): fail on all, never leave one in a collective.
    with fail_together("generate()"):
        if "synced_gpus" in kwargs:
            raise ValueError("generate: leave out synced_gpus; fsdp_nb sets it (True whenever there are 2+ ranks)")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens={max_new_tokens!r} must be a positive int")
        target = _generator(model)  # what .generate is called on; causal_lm(model): what its loop calls
        input_ids, attention_mask = left_padded(tokenizer, _prompts(prompts), _device(model))  # (B, T), (B, T)
    kwargs.setdefault("pad_token_id", _pad_id(tokenizer))
    if tokenizer.eos_token_id is not None:  # the tokenizer's eos, not the model config's default (Llama's is 2)
        kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    with eval_mode(model), torch.no_grad(), root_gathered(model, causal_lm(model), input_ids):
        out = target.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            synced_gpus=_world_size() > 1,  # [Note: every rank decodes every step]
            **kwargs,
        )  # (B, T + new)
    reshard_fsdp2(model)
    return tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)
