"""Accelerate's config formats <-> `FSDPConfig`, and the FSDP1 -> FSDP2 YAML conversion.

Three ways Accelerate spells the same options, all mapped here by one table:
the `fsdp_config:` block of an `accelerate config` YAML file (`fsdp_*` keys), the
`FSDP_*` environment variables `accelerate launch` sets for the training script,
and the `FSDPConfig` field names. `convert_to_fsdp2` applies the rules of
`accelerate to-fsdp2` to a YAML dict and says what it changed, and why.

Everything here is pure: dicts and mappings in, dicts and configs out. Reading
and writing files happens in `FSDPConfig.from_accelerate_yaml` and in `cli.py`.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any, Mapping

from fsdp_nb.config import BOOL_FIELDS, STRATEGY_NOTES, STRATEGY_TO_RESHARD, FSDPConfig, MixedPrecision, parse_bool

# FSDPConfig field -> (key in a YAML file's fsdp_config block, variable set by `accelerate launch`).
ACCELERATE_NAMES = {
    "fsdp_version": ("fsdp_version", "FSDP_VERSION"),
    "sharding_strategy": ("fsdp_sharding_strategy", "FSDP_SHARDING_STRATEGY"),
    "reshard_after_forward": ("fsdp_reshard_after_forward", "FSDP_RESHARD_AFTER_FORWARD"),
    "backward_prefetch": ("fsdp_backward_prefetch", "FSDP_BACKWARD_PREFETCH"),
    "forward_prefetch": ("fsdp_forward_prefetch", "FSDP_FORWARD_PREFETCH"),
    "auto_wrap_policy": ("fsdp_auto_wrap_policy", "FSDP_AUTO_WRAP_POLICY"),
    "transformer_cls_names_to_wrap": ("fsdp_transformer_layer_cls_to_wrap", "FSDP_TRANSFORMER_CLS_TO_WRAP"),
    "min_num_params": ("fsdp_min_num_params", "FSDP_MIN_NUM_PARAMS"),
    "cpu_offload": ("fsdp_offload_params", "FSDP_OFFLOAD_PARAMS"),
    "activation_checkpointing": ("fsdp_activation_checkpointing", "FSDP_ACTIVATION_CHECKPOINTING"),
    "state_dict_type": ("fsdp_state_dict_type", "FSDP_STATE_DICT_TYPE"),
    "cpu_ram_efficient_loading": ("fsdp_cpu_ram_efficient_loading", "FSDP_CPU_RAM_EFFICIENT_LOADING"),
    "use_orig_params": ("fsdp_use_orig_params", "FSDP_USE_ORIG_PARAMS"),
    "sync_module_states": ("fsdp_sync_module_states", "FSDP_SYNC_MODULE_STATES"),
    "ignored_modules": ("fsdp_ignored_modules", "FSDP_IGNORED_MODULES"),
}
YAML_KEY_TO_FIELD = {yaml_key: field for field, (yaml_key, _) in ACCELERATE_NAMES.items()}
MIXED_PRECISION_KEY, MIXED_PRECISION_ENV = "mixed_precision", "ACCELERATE_MIXED_PRECISION"
# Accelerate options fsdp_nb does not implement: accepted only when off.
UNSUPPORTED = {"fsdp_activation_checkpointing_offload": "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD"}

# `accelerate to-fsdp2`: FSDP1 keys dropped from an FSDP2 config, with the reason.
REMOVED_IN_FSDP2 = {
    "fsdp_backward_prefetch": "removed in FSDP2, which always prefetches like BACKWARD_PRE",
    "fsdp_sync_module_states": "removed in FSDP2, where it is redundant",
    "fsdp_use_orig_params": "removed in FSDP2, which always uses the original parameters",
    "fsdp_forward_prefetch": "not yet implemented for FSDP2 in Accelerate",
}
# ... and the keys whose FSDP1 strategy name becomes FSDP2's reshard_after_forward bool.
RENAMED_IN_FSDP2 = {"fsdp_sharding_strategy": "fsdp_reshard_after_forward",
                    "fsdp_reshard_after_forward": "fsdp_reshard_after_forward"}  # fmt: skip


def config_from_accelerate(config: Mapping[str, Any]) -> FSDPConfig:
    """An `FSDPConfig` from a parsed Accelerate YAML dict; ValueError names the key at fault.

    A missing `fsdp_version` means 1, as in Accelerate; a missing key means the
    `FSDPConfig` default. Keys without the `fsdp_` prefix get it, as `accelerate
    launch` does.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"expected a mapping of Accelerate options at the top level, got {type(config).__name__}")
    dist_type = config.get("distributed_type")
    if dist_type is not None and str(dist_type).upper() != "FSDP":
        raise ValueError(f"distributed_type is {dist_type!r}, not 'FSDP'")
    block = config.get("fsdp_config")
    if block is None or (not block and dist_type is None):
        raise ValueError("no fsdp_config section (run `accelerate config` and choose FSDP)")
    if not isinstance(block, Mapping):
        raise ValueError(f"fsdp_config must be a mapping of fsdp_* keys, got {type(block).__name__}")
    kwargs: dict[str, Any] = {"fsdp_version": 1}
    for raw_key, value in block.items():
        key = raw_key if str(raw_key).startswith("fsdp") else f"fsdp_{raw_key}"
        if key in UNSUPPORTED:
            if parse_bool(key, value) if isinstance(value, str) else bool(value):
                raise ValueError(f"{key}={value!r} is not supported by fsdp_nb; accepted: false")
            continue
        if key not in YAML_KEY_TO_FIELD:
            known = list(YAML_KEY_TO_FIELD) + list(UNSUPPORTED)
            close = difflib.get_close_matches(key, known, n=2)
            hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
            raise ValueError(f"unknown fsdp_config key {raw_key!r}{hint}; accepted: {', '.join(known)}")
        field = YAML_KEY_TO_FIELD[key]
        if field in BOOL_FIELDS and isinstance(value, str):
            value = parse_bool(key, value)
        if field == "fsdp_version" and isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        kwargs[field] = value
    precision = config.get(MIXED_PRECISION_KEY)
    if precision is not None:
        # YAML 1.1 reads an unquoted `no` as False.
        kwargs["mixed_precision"] = "no" if precision is False else precision
    return _build(kwargs, {f: k for f, (k, _) in ACCELERATE_NAMES.items()} | {"mixed_precision": MIXED_PRECISION_KEY})


def config_from_env(environ: Mapping[str, str]) -> FSDPConfig:
    """An `FSDPConfig` from the variables `accelerate launch` sets; absent ones keep the defaults.

    Mirrors how Accelerate's plugin reads them: FSDP_VERSION defaults to 1, truth
    words go through `str_to_bool`, and with FSDP2 the launcher's always-set
    FSDP_SHARDING_STRATEGY, FSDP_USE_ORIG_PARAMS and FSDP_SYNC_MODULE_STATES are
    not read. With FSDP1, a non-default FSDP_SHARDING_STRATEGY wins; otherwise
    FSDP_RESHARD_AFTER_FORWARD (where `accelerate config` stores the FSDP1
    strategy) decides.
    """
    env = {name: environ[name] for _, name in ACCELERATE_NAMES.values() if name in environ}
    version_text = env.get("FSDP_VERSION", "1").strip()
    if version_text not in ("1", "2"):
        raise ValueError(f"FSDP_VERSION={version_text!r} is not valid; accepted: 1 or 2")
    kwargs: dict[str, Any] = {"fsdp_version": int(version_text)}
    skip = {"fsdp_version", "sharding_strategy", "reshard_after_forward"}
    if kwargs["fsdp_version"] == 2:
        skip |= {"use_orig_params", "sync_module_states"}
    for field, (_, name) in ACCELERATE_NAMES.items():
        if field in skip or name not in env:
            continue
        text = env[name]
        if field in BOOL_FIELDS:
            kwargs[field] = parse_bool(name, text)
        elif field == "min_num_params":
            if not text.strip().isdigit():
                raise ValueError(f"{name}={text!r} is not valid; accepted: an int >= 0")
            kwargs[field] = int(text)
        else:
            kwargs[field] = text
    strategy = env.get("FSDP_SHARDING_STRATEGY", "").strip()
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD")
    if kwargs["fsdp_version"] == 1 and strategy and strategy.upper() not in ("FULL_SHARD", "1"):
        kwargs["sharding_strategy"] = strategy
    elif reshard is not None:
        kwargs["reshard_after_forward"] = reshard.strip()
    for yaml_key, name in UNSUPPORTED.items():
        if name in environ and parse_bool(name, environ[name]):
            raise ValueError(f"{name}={environ[name]!r} is not supported by fsdp_nb ({yaml_key}); accepted: false")
    if MIXED_PRECISION_ENV in environ:
        kwargs["mixed_precision"] = environ[MIXED_PRECISION_ENV]
    return _build(kwargs, {f: n for f, (_, n) in ACCELERATE_NAMES.items()} | {"mixed_precision": MIXED_PRECISION_ENV})


def _build(kwargs: dict[str, Any], source_names: Mapping[str, str]) -> FSDPConfig:
    """FSDPConfig(**kwargs), with the Accelerate name of the failing field in front of its error."""
    try:
        return FSDPConfig(**kwargs)
    except ValueError as err:
        field = str(err).split("=", 1)[0].split(".", 1)[0]
        prefix = f"{source_names[field]}: " if field in source_names and source_names[field] != field else ""
        raise ValueError(f"{prefix}{err}") from None


def accelerate_dict(config: FSDPConfig) -> dict[str, Any]:
    """The Accelerate YAML dict (`distributed_type`, `mixed_precision`, `fsdp_config`) for `config`.

    FSDP1 configs store the strategy name under `fsdp_reshard_after_forward`, as
    `accelerate config` writes them; FSDP2 configs leave out the keys FSDP2 removed.
    """
    if callable(config.auto_wrap_policy):
        raise ValueError("auto_wrap_policy is a callable, which an Accelerate YAML file cannot hold; "
                         "accepted: TRANSFORMER_BASED_WRAP, SIZE_BASED_WRAP, NO_WRAP")  # fmt: skip
    values = {f: getattr(config, f) for f in ACCELERATE_NAMES}
    values["reshard_after_forward"] = config.sharding_strategy if config.fsdp_version == 1 \
        else config.reshard_after_forward  # fmt: skip
    values["backward_prefetch"] = config.backward_prefetch or "NO_PREFETCH"
    names, modules = config.transformer_cls_names_to_wrap, config.ignored_modules
    values["transformer_cls_names_to_wrap"] = ",".join(names) if names else None
    values["ignored_modules"] = modules[0] if modules and len(modules) == 1 else (list(modules) if modules else None)
    drop = {"sharding_strategy"}
    if config.fsdp_version == 2:
        drop |= {k for k in ACCELERATE_NAMES if ACCELERATE_NAMES[k][0] in REMOVED_IN_FSDP2}
        if config.forward_prefetch:  # fsdp_nb's FSDP2 extension; Accelerate's FSDP2 plugin does not read it
            drop.discard("forward_prefetch")
    block = {ACCELERATE_NAMES[f][0]: v for f, v in values.items() if f not in drop and v is not None}
    return {"distributed_type": "FSDP", MIXED_PRECISION_KEY: _precision_name(config), "fsdp_config": block}


def _precision_name(config: FSDPConfig) -> str:
    mp = config.mixed_precision
    if mp is None:
        return "no"
    for name in ("bf16", "fp16"):
        if mp == MixedPrecision(param_dtype=name):
            return name
    raise ValueError(f"mixed_precision={mp!r} has no Accelerate name; accepted: 'no', 'bf16', 'fp16' "
                     "(bf16 or fp16 compute with fp32 gradient reduction)")  # fmt: skip


def convert_to_fsdp2(config: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Apply `accelerate to-fsdp2`'s rules to a YAML dict; returns (new dict, change notes).

    The input is not modified. Keys the rules do not know are carried over unchanged;
    a config with no fsdp_config, or already at fsdp_version 2, comes back as it was.
    """
    new = copy.deepcopy(dict(config))
    block = new.get("fsdp_config") or {}
    if not block:
        return new, ["no fsdp_config section: nothing to convert"]
    if block.get("fsdp_version", 1) == 2:
        return new, ["fsdp_version is already 2: nothing converted (if the file still uses FSDP1 keys, "
                     "set fsdp_version: 1 and run the conversion again)"]  # fmt: skip
    converted: dict[str, Any] = {}
    notes: list[str] = []
    for key, value in block.items():
        if key in REMOVED_IN_FSDP2:
            notes.append(f"{key}: dropped, {REMOVED_IN_FSDP2[key]}")
            if key == "fsdp_forward_prefetch" and value is True:
                notes.append("fsdp_forward_prefetch: fsdp_nb does implement it for FSDP2; "
                             "add `fsdp_forward_prefetch: true` back to use it with fsdp_nb")  # fmt: skip
            continue
        if key not in RENAMED_IN_FSDP2:
            converted[key] = value
            if key == "fsdp_state_dict_type" and str(value).upper() == "LOCAL_STATE_DICT":
                notes.append("fsdp_state_dict_type: LOCAL_STATE_DICT copied unchanged, but FSDP2 has no "
                             "equivalent; change it to SHARDED_STATE_DICT")  # fmt: skip
            continue
        new_key, new_value = RENAMED_IN_FSDP2[key], value
        name = value.strip().upper() if isinstance(value, str) else None
        if name in STRATEGY_TO_RESHARD:
            new_value = STRATEGY_TO_RESHARD[name]
            lost = STRATEGY_NOTES.get(name, "").strip()
            notes.append(f"{key}: {value} -> {new_key}: {str(new_value).lower()}" + (f" ({lost})" if lost else ""))
        elif not isinstance(value, bool):
            notes.append(f"{key}: {value!r} is not a sharding strategy or a bool; copied unchanged")
        if new_key in converted and converted[new_key] != new_value:
            notes.append(f"{new_key}: {converted[new_key]!r} from an earlier key replaced by {new_value!r} "
                         f"from {key} (the later key wins)")  # fmt: skip
        converted[new_key] = new_value
    converted["fsdp_version"] = 2
    notes.append("fsdp_version: set to 2")
    new["fsdp_config"] = converted
    return new, notes
