"""What a model is, to Hugging Face: a Transformers causal LM, a PEFT model around one, or neither.

Reads only `sys.modules`: a process that never imported `transformers` (or `peft`)
cannot hold one of their models, and fsdp_nb must not import them for it (an
optional extra, and seconds of import time on every rank).
"""

from __future__ import annotations

import sys

from torch import nn


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module an FSDP1 root wrapper holds (`.module`, public); anything else as it is."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    while isinstance(model, FSDP):
        model = model.module
    return model


def peft_model_of(model: nn.Module) -> nn.Module | None:
    """The `peft.PeftModel` that `model` is (or that an FSDP1 wrapper holds), or None."""
    peft = sys.modules.get("peft")
    if peft is None:
        return None
    inner = _unwrapped(model)
    return inner if isinstance(inner, peft.PeftModel) else None


def causal_lm(model: nn.Module) -> nn.Module | None:
    """The `transformers.PreTrainedModel` inside `model` (itself, an FSDP1 wrapper's, or a PEFT
    model's base), or None when `model` is not a Transformers model."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return None
    inner = _unwrapped(model)
    peft = peft_model_of(inner)
    if peft is not None:
        inner = peft.get_base_model()
    return inner if isinstance(inner, transformers.PreTrainedModel) else None
