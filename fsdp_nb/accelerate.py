"""Accelerate's FSDP vocabulary: one table of options, and everything derived from it.

Accelerate spells each FSDP option three ways: a key in the `fsdp_config:` block of
an `accelerate config` YAML file (`fsdp_*`), a variable that `accelerate launch`
sets for the training script (`FSDP_*`), and a field of its
`FullyShardedDataParallelPlugin`, which `FSDPConfig` copies. `OPTIONS` below holds
one row per option with all three spellings, plus what happens to the option when
a config moves from FSDP1 to FSDP2. Both directions are derived from that table:
reading YAML files and variables into `FSDPConfig` fields, writing a config back as
Accelerate YAML, and the FSDP1 -> FSDP2 rules that `FSDPConfig` and `fsdp-nb
to-fsdp2` apply.

The mesh sizes (Accelerate's `ParallelismConfig`, a section of the same file) have
their own table in `fsdp_nb.parallelism`; the readers and the writer here take them too.

This module is a leaf: plain data and pure functions over mappings. It never
builds an `FSDPConfig` itself (config.py does, from what this module returns), so
the config can use the table without an import cycle.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fsdp_nb import parallelism
from fsdp_nb.precision import MixedPrecision
from fsdp_nb.validate import parse_bool

FSDP_VERSIONS = (1, 2)
# Ordered as torch's ShardingStrategy values 1..5 (torch spells 5 `_HYBRID_SHARD_ZERO2`).
SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2")
BACKWARD_PREFETCH = ("BACKWARD_PRE", "BACKWARD_POST", "NO_PREFETCH")
AUTO_WRAP_POLICIES = ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP")
STATE_DICT_TYPES = ("SHARDED_STATE_DICT", "FULL_STATE_DICT")

# FSDP1 sharding strategy -> FSDP2 reshard_after_forward, as `accelerate to-fsdp2` maps it.
STRATEGY_TO_RESHARD = {
    "FULL_SHARD": True,
    "SHARD_GRAD_OP": False,
    "NO_SHARD": False,
    "HYBRID_SHARD": True,
    "HYBRID_SHARD_ZERO2": False,
}
_HYBRID_NOTE = (
    "FSDP2 hybrid sharding comes from a 2-D device mesh (replicate, shard), not from this option: add "
    "`parallelism_config_dp_replicate_size: R` under `parallelism_config:` (FSDPConfig: dp_replicate_size=R), "
    "or FSDP2 shards over all ranks. "
)
# What the plain True/False mapping above loses, said once per strategy.
STRATEGY_NOTES = {
    "NO_SHARD": "FSDP2 has no NO_SHARD: it still shards parameters across ranks and "
    "False only keeps them gathered from forward to backward; for pure replication use DDP. ",
    "HYBRID_SHARD": _HYBRID_NOTE,
    "HYBRID_SHARD_ZERO2": _HYBRID_NOTE,
}

_KEPT = object()  # `Option.fsdp2_value` of a removed option that fsdp_nb still implements


@dataclass(frozen=True)
class Option:
    """One FSDP option in Accelerate's three spellings, and its fate under FSDP2."""

    field: str
    """`FSDPConfig` field (Accelerate's plugin attribute)."""
    yaml_key: str
    """Key in a YAML file's `fsdp_config:` block."""
    env: str
    """Variable `accelerate launch` sets."""
    kind: str = "str"
    """How text from YAML or the environment is read: "bool", "int" or "str"."""
    fsdp2: str = "same"
    """Under FSDP2: "same"; "reshard" (the strategy becomes `reshard_after_forward`);
    or "removed" (`accelerate to-fsdp2` drops the key)."""
    dropped_note: str = ""
    """For removed options: what `accelerate to-fsdp2` says when it drops the key."""
    fsdp2_value: Any = _KEPT
    """For removed options: the value FSDP2 behaves as, which `FSDPConfig(fsdp_version=2)`
    sets with a warning; `_KEPT` when fsdp_nb still implements the option for FSDP2."""
    fsdp2_why: str = ""
    """Why `FSDPConfig` ignores the option under FSDP2."""
    always_set: bool = False
    """`accelerate launch` sets the variable even when the YAML file leaves the option out,
    so under FSDP2, which removed it, the variable says nothing about the user's intent."""


OPTIONS: tuple[Option, ...] = (
    Option("fsdp_version", "fsdp_version", "FSDP_VERSION", kind="int"),
    Option("sharding_strategy", "fsdp_sharding_strategy", "FSDP_SHARDING_STRATEGY", fsdp2="reshard"),
    Option("reshard_after_forward", "fsdp_reshard_after_forward", "FSDP_RESHARD_AFTER_FORWARD", fsdp2="reshard"),
    Option(
        "backward_prefetch",
        "fsdp_backward_prefetch",
        "FSDP_BACKWARD_PREFETCH",
        fsdp2="removed",
        dropped_note="removed in FSDP2, which always prefetches like BACKWARD_PRE",
        fsdp2_value="BACKWARD_PRE",
        fsdp2_why="FSDP2 always prefetches the next all-gather in backward, like BACKWARD_PRE",
    ),
    Option(
        "forward_prefetch",
        "fsdp_forward_prefetch",
        "FSDP_FORWARD_PREFETCH",
        kind="bool",
        fsdp2="removed",
        dropped_note="not yet implemented for FSDP2 in Accelerate",  # fsdp_nb implements it: _KEPT
    ),
    Option("auto_wrap_policy", "fsdp_auto_wrap_policy", "FSDP_AUTO_WRAP_POLICY"),
    Option("transformer_cls_names_to_wrap", "fsdp_transformer_layer_cls_to_wrap", "FSDP_TRANSFORMER_CLS_TO_WRAP"),
    Option("min_num_params", "fsdp_min_num_params", "FSDP_MIN_NUM_PARAMS", kind="int"),
    Option("cpu_offload", "fsdp_offload_params", "FSDP_OFFLOAD_PARAMS", kind="bool"),
    Option("activation_checkpointing", "fsdp_activation_checkpointing", "FSDP_ACTIVATION_CHECKPOINTING", kind="bool"),
    Option("state_dict_type", "fsdp_state_dict_type", "FSDP_STATE_DICT_TYPE"),
    Option(
        "cpu_ram_efficient_loading", "fsdp_cpu_ram_efficient_loading", "FSDP_CPU_RAM_EFFICIENT_LOADING", kind="bool"
    ),
    Option(
        "use_orig_params",
        "fsdp_use_orig_params",
        "FSDP_USE_ORIG_PARAMS",
        kind="bool",
        fsdp2="removed",
        always_set=True,
        dropped_note="removed in FSDP2, which always uses the original parameters",
        fsdp2_value=True,
        fsdp2_why="FSDP2 always uses the original parameters, one DTensor each",
    ),
    Option(
        "sync_module_states",
        "fsdp_sync_module_states",
        "FSDP_SYNC_MODULE_STATES",
        kind="bool",
        fsdp2="removed",
        always_set=True,
        dropped_note="removed in FSDP2, where it is redundant",
        fsdp2_value=False,
        fsdp2_why="it is redundant in FSDP2; cpu_ram_efficient_loading=True loads on rank 0 and broadcasts",
    ),
    Option("ignored_modules", "fsdp_ignored_modules", "FSDP_IGNORED_MODULES"),
)
MIXED_PRECISION_KEY, MIXED_PRECISION_ENV = "mixed_precision", "ACCELERATE_MIXED_PRECISION"
# Older spellings of YAML keys that configs in the wild still carry: legacy key -> current key.
LEGACY_YAML_KEYS = {"fsdp_backward_prefetch_policy": "fsdp_backward_prefetch"}
# Accelerate options fsdp_nb does not implement: accepted only when off.
UNSUPPORTED = {"fsdp_activation_checkpointing_offload": "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD"}

# ---- derived from OPTIONS: nothing below lists an option by hand ----------------------
BY_FIELD = {o.field: o for o in OPTIONS}
YAML_KEY_TO_FIELD = {o.yaml_key: o.field for o in OPTIONS}
BOOL_FIELDS = tuple(o.field for o in OPTIONS if o.kind == "bool")
# `accelerate to-fsdp2`: FSDP1 keys dropped from an FSDP2 config, with what it says ...
REMOVED_IN_FSDP2 = {o.yaml_key: o.dropped_note for o in OPTIONS if o.fsdp2 == "removed"}
# ... and the keys whose FSDP1 strategy name becomes FSDP2's reshard_after_forward bool.
RENAMED_IN_FSDP2 = {o.yaml_key: BY_FIELD["reshard_after_forward"].yaml_key for o in OPTIONS if o.fsdp2 == "reshard"}
# FSDP1-only options that FSDPConfig(fsdp_version=2) ignores: the value FSDP2 behaves as, and why.
IGNORED_IN_FSDP2 = {
    o.field: (o.fsdp2_value, o.fsdp2_why) for o in OPTIONS if o.fsdp2 == "removed" and o.fsdp2_value is not _KEPT
}
YAML_NAMES = {o.field: o.yaml_key for o in OPTIONS} | {"mixed_precision": MIXED_PRECISION_KEY} | parallelism.YAML_NAMES
ENV_NAMES = {o.field: o.env for o in OPTIONS} | {"mixed_precision": MIXED_PRECISION_ENV} | parallelism.ENV_NAMES


def fields_from_yaml(config: Mapping[str, Any]) -> dict[str, Any]:
    """`FSDPConfig` keyword arguments from a parsed Accelerate YAML dict; ValueError names the key at fault.

    A missing `fsdp_version` means 1, as in Accelerate; a missing key means the
    `FSDPConfig` default. Keys without the `fsdp_` prefix get it, as `accelerate
    launch` does. Mesh sizes come from the `parallelism_config:` section.
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
        key = LEGACY_YAML_KEYS.get(key, key)
        if key in UNSUPPORTED:
            if parse_bool(key, value) if isinstance(value, str) else bool(value):
                raise ValueError(f"{key}={value!r} is not supported by fsdp_nb; accepted: false")
            continue
        if key not in YAML_KEY_TO_FIELD:
            known = list(YAML_KEY_TO_FIELD) + list(UNSUPPORTED)
            close = difflib.get_close_matches(key, known, n=2)
            hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
            raise ValueError(f"unknown fsdp_config key {raw_key!r}{hint}; accepted: {', '.join(known)}")
        option = BY_FIELD[YAML_KEY_TO_FIELD[key]]
        if isinstance(value, str) and option.kind == "bool":
            value = parse_bool(key, value)
        elif isinstance(value, str) and option.kind == "int" and value.strip().isdigit():
            value = int(value)
        kwargs[option.field] = value
    precision = config.get(MIXED_PRECISION_KEY)
    if precision is not None:
        # YAML 1.1 reads an unquoted `no` as False.
        kwargs["mixed_precision"] = "no" if precision is False else precision
    return kwargs | parallelism.sizes_from_yaml(config.get(parallelism.SECTION))


def fields_from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """`FSDPConfig` keyword arguments from the variables `accelerate launch` sets.

    Mirrors how Accelerate's plugin reads them: FSDP_VERSION defaults to 1, truth
    words go through `str_to_bool`, and with FSDP2 the variables that the launcher
    always sets for options FSDP2 removed are not read. With FSDP1, a non-default
    FSDP_SHARDING_STRATEGY wins; otherwise FSDP_RESHARD_AFTER_FORWARD (where
    `accelerate config` stores the FSDP1 strategy) decides. Mesh sizes come from the
    PARALLELISM_CONFIG_* variables, under ACCELERATE_USE_PARALLELISM_CONFIG=true.
    """
    env = {o.env: environ[o.env] for o in OPTIONS if o.env in environ}
    version_text = env.get("FSDP_VERSION", "1").strip()
    if version_text not in ("1", "2"):
        raise ValueError(f"FSDP_VERSION={version_text!r} is not valid; accepted: 1 or 2")
    kwargs: dict[str, Any] = {"fsdp_version": int(version_text)}
    for option in OPTIONS:
        skip = option.field == "fsdp_version" or option.fsdp2 == "reshard"  # read below
        if skip or (kwargs["fsdp_version"] == 2 and option.always_set) or option.env not in env:
            continue
        text = env[option.env]
        if option.kind == "bool":
            kwargs[option.field] = parse_bool(option.env, text)
        elif option.kind == "int":
            if not text.strip().isdigit():
                raise ValueError(f"{option.env}={text!r} is not valid; accepted: an int >= 0")
            kwargs[option.field] = int(text)
        else:
            kwargs[option.field] = text
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
    return kwargs | parallelism.sizes_from_env(environ)


def accelerate_dict(config) -> dict[str, Any]:
    """The Accelerate YAML dict (`distributed_type`, `mixed_precision`, `fsdp_config`) of an `FSDPConfig`.

    FSDP1 configs store the strategy name under `fsdp_reshard_after_forward`, as
    `accelerate config` writes them; FSDP2 configs leave out the keys FSDP2 removed.
    Mesh sizes other than the defaults go to a `parallelism_config:` section.
    """
    if callable(config.auto_wrap_policy):
        raise ValueError(
            "auto_wrap_policy is a callable, which an Accelerate YAML file cannot hold; "
            "accepted: TRANSFORMER_BASED_WRAP, SIZE_BASED_WRAP, NO_WRAP"
        )
    values = {o.field: getattr(config, o.field) for o in OPTIONS}
    version1 = config.fsdp_version == 1
    values["reshard_after_forward"] = config.sharding_strategy if version1 else config.reshard_after_forward
    values["backward_prefetch"] = config.backward_prefetch or "NO_PREFETCH"
    names, modules = config.transformer_cls_names_to_wrap, config.ignored_modules
    values["transformer_cls_names_to_wrap"] = ",".join(names) if names else None
    values["ignored_modules"] = modules[0] if modules and len(modules) == 1 else (list(modules) if modules else None)
    drop = {"sharding_strategy"}
    if not version1:
        drop |= {o.field for o in OPTIONS if o.fsdp2 == "removed"}
        if config.forward_prefetch:  # fsdp_nb's FSDP2 extension; Accelerate's FSDP2 plugin does not read it
            drop.discard("forward_prefetch")
    block = {BY_FIELD[f].yaml_key: v for f, v in values.items() if f not in drop and v is not None}
    out = {"distributed_type": "FSDP", MIXED_PRECISION_KEY: _precision_name(config), "fsdp_config": block}
    sizes = parallelism.sizes_to_yaml(config)
    return out | {parallelism.SECTION: sizes} if sizes else out


def _precision_name(config) -> str:
    mp = config.mixed_precision
    if mp is None:
        return "no"
    for name in ("bf16", "fp16"):
        if mp == MixedPrecision(param_dtype=name):
            return name
    raise ValueError(
        f"mixed_precision={mp!r} has no Accelerate name; accepted: 'no', 'bf16', 'fp16' "
        "(bf16 or fp16 compute with fp32 gradient reduction)"
    )
