"""How the Trainer gets a loss from a model: three forms, in this order of precedence.

1. `Trainer(..., loss_fn=fn)` with `fn(model, batch) -> loss`: any model. `batch` is
   this micro-step's `(x, y)`, each `(b, T)`, already on the rank's device.
2. A Hugging Face causal LM (a `transformers.PreTrainedModel`, or a PEFT model around
   one), called as `model(input_ids=ids, labels=ids, use_cache=False)`; its `.loss`.
3. The `(x, y)` form: `model(x, y) -> (logits, loss)`, as fsdp_nb's GPT and nanoGPT.

The data gives blocks `(x, y)` with `y` = `x` shifted by one token. A causal LM shifts
its labels itself, so form 2 gets the unshifted ids of the whole block, `x` and the
last token of `y` (T + 1 ids): it predicts the same T tokens as form 3. Passing the
pre-shifted `y` as labels would shift twice and train on the token after next.
`use_cache=False`: training never reads a KV cache, and a recomputed (checkpointed)
layer would append to one a second time.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from fsdp_nb.hf.detect import causal_lm

LOSS_FN, HF, XY = "loss_fn", "hf", "xy"
FORMS_HELP = (
    "the Trainer takes model(x, y) -> (logits, loss), a Hugging Face causal LM "
    "(model(input_ids=..., labels=...) -> .loss), or any model with Trainer(..., loss_fn=fn), "
    "fn(model, (x, y)) -> loss"
)


def choose_form(model: nn.Module, loss_fn: Callable | None) -> str:
    """Which form trains `model` (the model as given, before sharding); refuses one that fits none."""
    if loss_fn is not None:
        if not callable(loss_fn):
            raise TypeError(f"Trainer: loss_fn={loss_fn!r} is not callable; {FORMS_HELP}")
        return LOSS_FN
    if causal_lm(model) is not None:
        return HF
    try:
        inspect.signature(model.forward).bind(object(), object())
    except TypeError:
        raise TypeError(
            f"Trainer: {type(model).__name__}.forward cannot be called as model(x, y); {FORMS_HELP}"
        ) from None
    except ValueError:  # no signature to read (a builtin): let the first call decide
        pass
    return XY


def block_ids(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The whole block, unshifted: `x` and the last token of `y`, `(b, T + 1)`."""
    return torch.cat([x, y[:, -1:]], dim=1)


def compute_loss(form: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable | None = None):
    """The mean loss of one micro-batch `(x, y)`, each `(b, T)`, as a scalar tensor."""
    if form == LOSS_FN:
        loss = loss_fn(model, (x, y))
        what = "loss_fn(model, batch)"
    elif form == HF:
        ids = block_ids(x, y)  # (b, T + 1): the model shifts the labels itself
        out = model(input_ids=ids, labels=ids, use_cache=False)
        loss = getattr(out, "loss", None)
        what = f"{type(model).__name__}(input_ids=..., labels=...).loss"
    else:
        out = model(x, y)
        loss = out[1] if isinstance(out, (tuple, list)) and len(out) == 2 else None
        what = f"{type(model).__name__}(x, y)[1]"
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
        got = type(loss).__name__ if loss is not None else "no loss"
        raise TypeError(f"Trainer: {what} gave {got}, not a scalar loss tensor; {FORMS_HELP}")
    return loss.reshape(())
