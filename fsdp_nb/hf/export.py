"""Writing Hugging Face directories: what a checkpoint records of a Transformers model, and the files
that `AutoModelForCausalLM.from_pretrained` (or `PeftModel.from_pretrained`) reads back.

Two halves, used at two moments:
- `record(model)`, at save time: the model's config (as its `config.json` would hold it), its generation
  config, and for a PEFT model each adapter's PEFT config. JSON, kept in the checkpoint's manifest, so a
  merge needs neither the model's code nor the process that trained it.
- `pretrained_state(weights, record, directory)`, at merge time: writes `config.json` (and
  `generation_config.json`) into `directory` and returns the tensors to write beside them, keyed as the
  base architecture names them. A PEFT model's adapters are folded into the base weights by peft's own
  `merge_and_unload`, on a model rebuilt from the recorded configs on the meta device: no memory but the
  weights themselves, and exactly peft's arithmetic.

`publish_files` moves what was written into place file by file, each rename atomic, the file that makes
the directory loadable (`config.json`, `adapter_config.json`) last: a cut-off write never leaves a
directory that loads with missing weights.

Imports transformers and peft only inside the functions that need them, and nothing of
`fsdp_nb.checkpoint` (which imports this module).
"""

from __future__ import annotations

import enum
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from fsdp_nb.hf.detect import causal_lm, peft_model_of

CONFIG_NAME, GENERATION_NAME = "config.json", "generation_config.json"
PEFT_PREFIX = "base_model.model."  # PeftModel -> its tuner (LoraModel, ...) -> the base model


# ---- save time ---------------------------------------------------------------------------------------


def record(model: nn.Module) -> dict | None:
    """What `merge_weights` needs to write a `from_pretrained` directory for `model`; None for a model
    that is not a Transformers model (itself, inside an FSDP1 wrapper, or the base of a PEFT model)."""
    lm = causal_lm(model)
    if lm is None:
        return None
    config = json.loads(lm.config.to_json_string(use_diff=False))
    if not config.get("architectures"):  # a model built from a config has none; from_pretrained's do
        config["architectures"] = [class_name(lm)]
    out = {"config": config}
    generation = getattr(lm, "generation_config", None)
    if generation is not None:
        out["generation_config"] = json.loads(generation.to_json_string(use_diff=True))
    peft = peft_model_of(model)
    if peft is not None:
        out["peft"] = {name: jsonable(cfg.to_dict()) for name, cfg in peft.peft_config.items()}
        out["peft_active"] = list(peft.active_adapters)
    return out


def class_name(module: nn.Module) -> str:
    """The model's own class name: FSDP2's `fully_shard` makes a subclass `FSDP<name>` of it, skipped here."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule)).__name__


def jsonable(value):
    """A PEFT config's `to_dict()` as JSON holds it: sets as sorted lists (PEFT writes them as lists),
    enums (`PeftType.LORA`) as their values. Anything else that JSON cannot hold raises TypeError."""

    def convert(o):
        if isinstance(o, (set, frozenset)):
            return sorted(o, key=str)
        if isinstance(o, enum.Enum):
            return o.value
        raise TypeError(f"{type(o).__name__} is not JSON-able")

    return json.loads(json.dumps(value, default=convert))


# ---- merge time ----------------------------------------------------------------------------------------


def pretrained_state(weights: dict[str, torch.Tensor], rec: dict, directory: Path) -> dict[str, torch.Tensor]:
    """Write `config.json` (and `generation_config.json`) for `rec` into `directory`; return the tensors
    of `model.safetensors`: base-architecture keys, adapters folded in, each tied weight once.

    The model is rebuilt on the meta device from the config just written, read back by
    `AutoConfig.from_pretrained` as the user's `from_pretrained` will read it; it holds no memory until
    the weights are assigned to it, and only a PEFT model is (to fold its adapters)."""
    import transformers

    config = dict(rec["config"])
    dtype = next((t.dtype for t in weights.values() if t.is_floating_point()), None)
    if dtype is not None:  # the dtype the weights are in: from_pretrained(dtype="auto") then keeps it
        config["dtype"] = str(dtype).removeprefix("torch.")
    write_json(directory / CONFIG_NAME, config)
    if rec.get("generation_config"):
        transformers.GenerationConfig.from_dict(rec["generation_config"]).save_pretrained(directory)
    base = meta_model(transformers.AutoConfig.from_pretrained(directory, local_files_only=True))
    expected = set(base.state_dict())  # the base architecture's names: no PEFT, FSDP or wrapper parts
    ties = tie_groups(base)
    if rec.get("peft"):  # a PeftModel names the base's tensors under base_model.model.
        weights = _folded(meta_peft(base, rec), with_ties(weights, [[PEFT_PREFIX + n for n in g] for g in ties]))
    weights = with_ties(weights, ties)
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(f"the weights do not fit {type(base).__name__}: missing {missing[:3]}, unexpected {extra[:3]}")
    return _original_format(base, without_duplicates(weights, ties))


def config_from_record(rec: dict):
    """The Transformers config object of a record (`AutoConfig`'s class for its `model_type`)."""
    import transformers

    return transformers.CONFIG_MAPPING[rec["config"]["model_type"]].from_dict(dict(rec["config"]))


def meta_model(config) -> nn.Module:
    """The class that the config's `architectures` names, built on the meta device: shapes and names, no memory."""
    import transformers

    name = (config.architectures or [""])[0]
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise ValueError(f"Transformers {transformers.__version__} has no model class {name!r} (the config's "
                         "architectures); use a model of the installed Transformers library")  # fmt: skip
    with torch.device("meta"):
        return cls(config)


def meta_peft(base: nn.Module, rec: dict) -> nn.Module:
    """A PEFT model around `base` (on meta) from the recorded adapter configs, the recorded ones active:
    the same module names as the trained one, without FSDP's or activation checkpointing's wrappers."""
    from peft import PeftConfig, get_peft_model

    configs = {name: PeftConfig.from_peft_type(**cfg) for name, cfg in rec["peft"].items()}
    first, *others = configs
    with torch.device("meta"):
        peft = get_peft_model(base, configs[first], adapter_name=first)
        for name in others:
            peft.add_adapter(name, configs[name])
    for name, cfg in rec["peft"].items():  # get_peft_model names the meta base ("") as the base model
        peft.peft_config[name].base_model_name_or_path = cfg.get("base_model_name_or_path")
    if others:
        peft.base_model.set_adapter(rec.get("peft_active") or [first])
    return peft


def tie_groups(model: nn.Module) -> list[list[str]]:
    """Names that hold one tensor (tied embeddings: `model.embed_tokens.weight`, `lm_head.weight`), the
    name `named_parameters()` keeps first: the input embedding, which Transformers' files hold."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def with_ties(weights: dict[str, torch.Tensor], ties: list[list[str]]) -> dict[str, torch.Tensor]:
    """Every name of a tie group present, from whichever name `weights` holds: a state dict may name a
    tied tensor once (Transformers' own files do), and the strict load that folds adapters wants all."""
    weights = dict(weights)
    for group in ties:
        present = next((weights[n] for n in group if n in weights), None)
        if present is not None:
            for name in group:
                weights.setdefault(name, present)
    return weights


def without_duplicates(weights: dict[str, torch.Tensor], ties: list[list[str]]) -> dict[str, torch.Tensor]:
    """Drop the second name of each tie group whose values are equal, as `save_pretrained` does; a
    group whose values differ (the config says tied, training untied them) keeps both, and
    `from_pretrained` then leaves them untied."""
    weights = dict(weights)
    for first, *others in ties:
        for name in others:
            if name in weights and first in weights and torch.equal(weights[name], weights[first]):
                del weights[name]
    return weights


def _folded(peft: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's weights with the active adapters folded in by peft's `merge_and_unload`
    (W + scaling * B @ A for LoRA), on `peft` rebuilt on meta: the checkpoint's tensors are assigned."""
    if not hasattr(peft, "merge_and_unload"):  # prompt learning: nothing to fold into the weights
        kind = peft.active_peft_config.peft_type
        raise ValueError(f"a {getattr(kind, 'value', kind)} adapter cannot be folded into the base weights; "
                         "save it with fsdp_nb.hf.save_adapter instead")  # fmt: skip
    peft.load_state_dict(weights, strict=True, assign=True)  # the checkpoint's tensors, not copies
    return dict(peft.merge_and_unload().state_dict())


def _original_format(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as the architecture's files hold them: Transformers renames some at load (fused experts of
    mixture-of-experts models) and reverts that when it saves; Llama and most models have nothing to revert."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a Transformers without load-time conversions: the model's keys are the files' keys
        return weights
    return revert_weight_conversion(model, weights)


# ---- files ----------------------------------------------------------------------------------------------


def write_json(path: Path, body: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(body, f, indent=2, sort_keys=True)
        f.write("\n")


def temporary_dir(out: Path) -> Path:
    """A fresh directory inside `out` for files on their way there: the same file system, so renames work."""
    tmp = out / f".fsdp_nb-tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir(parents=True)
    return tmp


def publish_files(tmp: Path, out: Path, *, last: str) -> list[Path]:
    """Move every file under `tmp` to the same place under `out`, files named `last` (in any folder)
    after all others, each by an atomic rename after an fsync; remove `tmp`. Returns the paths written."""
    names = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    names.sort(key=lambda n: n.rsplit("/", 1)[-1] == last)  # stable: everything else first, in name order
    written = []
    for name in names:
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).replace(target)
        written.append(target)
    shutil.rmtree(tmp, ignore_errors=True)
    _sync_dir(out)
    return written


def _sync_dir(directory: Path) -> None:
    if os.name == "nt":  # Windows cannot open a directory as a file
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # a file system that cannot sync directories: the renames stand, durability is its own
        pass
    finally:
        os.close(fd)
