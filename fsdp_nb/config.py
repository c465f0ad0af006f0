"""`FSDPConfig`: one set of FSDP options for FSDP1 and FSDP2, in Accelerate's vocabulary.

Field names follow Accelerate's `FullyShardedDataParallelPlugin`, so a user who
knows `accelerate config` knows this class. Validation follows the FSDP1 -> FSDP2
table in `fsdp_nb.accelerate`: FSDP1-only options given with `fsdp_version=2` are
converted (with a FutureWarning) or ignored (with a UserWarning that says why).

[Note: one resharding field per version]
FSDP1 says how much to reshard with `sharding_strategy`; FSDP2 says it with
`reshard_after_forward`. After `__post_init__` exactly one of the two is set:
`sharding_strategy` for version 1, `reshard_after_forward` for version 2; the
other is None. So `dataclasses.replace(config, ...)` on a validated config never
sees a conflict, and `replace(config, fsdp_version=2)` migrates an FSDP1 config
by the table (strategy -> bool as `accelerate to-fsdp2` maps it).

[Note: table-driven validation]
`__post_init__` runs `_FIELD_CHECKS` in order: one function per field that returns
the field's canonical value or raises ValueError naming field, value and accepted
values. Only then come the rules that tie fields together (the resharding pair,
the FSDP2 migration), each a method of its own.

This module is pure: no process state. Accelerate's names live in accelerate.py,
dtype handling in precision.py, the shared field checks in validate.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from fsdp_nb.accelerate import (
    AUTO_WRAP_POLICIES,
    BACKWARD_PREFETCH,
    BOOL_FIELDS,
    ENV_NAMES,
    FSDP_VERSIONS,
    IGNORED_IN_FSDP2,
    SHARDING_STRATEGIES,
    STATE_DICT_TYPES,
    STRATEGY_NOTES,
    STRATEGY_TO_RESHARD,
    YAML_KEY_TO_FIELD,
    YAML_NAMES,
    accelerate_dict,
    fields_from_env,
    fields_from_yaml,
)
from fsdp_nb.precision import MixedPrecision, mixed_precision_of
from fsdp_nb.validate import (
    FALSE_WORDS,
    TRUE_WORDS,
    check_bool,
    choice,
    invalid,
    is_int,
    name_list,
    parse_bool,
    warn_user,
)


# ---- one check per field [Note: table-driven validation] ---------------------------
def _version(value: Any) -> int:
    if not is_int(value) or value not in FSDP_VERSIONS:
        raise invalid("fsdp_version", value, "1 or 2")
    return value


def _strategy(value: Any) -> str | None:
    return (
        None
        if value is None
        else choice("sharding_strategy", value, SHARDING_STRATEGIES, dict(enumerate(SHARDING_STRATEGIES, 1)))
    )


def _reshard(value: Any) -> bool | int | str | None:
    """Type checks that hold for both versions; a strategy name comes back upper-cased."""
    if value is None or isinstance(value, bool):
        return value
    accepted = f"True, False, an int >= 2 (FSDP2) or one of {', '.join(SHARDING_STRATEGIES)}"
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return parse_bool("reshard_after_forward", value)
    number = int(value) if isinstance(value, str) and value.strip().isdigit() else value
    if is_int(number):
        if number < 2:
            raise invalid("reshard_after_forward", number, accepted, "an int n reshards to n ranks: 1 is False")
        return number
    if isinstance(value, (str, enum.Enum)):
        name = value.name.lstrip("_") if isinstance(value, enum.Enum) else value.strip().upper()
        if name in SHARDING_STRATEGIES:
            return name
    raise invalid("reshard_after_forward", value, accepted)


def _prefetch(value: Any) -> str | None:
    if value is None:
        return None
    name = choice("backward_prefetch", value, BACKWARD_PREFETCH, {1: "BACKWARD_PRE", 2: "BACKWARD_POST"})
    return None if name == "NO_PREFETCH" else name


def _bool(field: str) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        check_bool(field, value)
        return value

    return check


def _policy(value: Any) -> str | Callable:
    policy = "NO_WRAP" if value is None else value
    return policy if callable(policy) else choice("auto_wrap_policy", policy, AUTO_WRAP_POLICIES)


def _cls_names(value: Any) -> tuple[str, ...] | None:
    names = name_list("transformer_cls_names_to_wrap", value, comma_separated=True)
    for name in names or ():
        if not name.isidentifier():
            raise invalid("transformer_cls_names_to_wrap", name, "Python class names such as 'Block'")
    return names


def _min_num_params(value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not is_int(value) or value < 0:
        raise invalid("min_num_params", value, "an int >= 0")
    return value


def _state_dict_type(value: Any) -> str:
    name = value.name if isinstance(value, enum.Enum) else value
    if str(name).strip().upper() in ("LOCAL_STATE_DICT", "2"):
        raise invalid(
            "state_dict_type",
            value,
            ", ".join(STATE_DICT_TYPES),
            "LOCAL_STATE_DICT is obsolete: it saves FSDP1's flat shards, which only the same world "
            "size and wrapping can read, and FSDP2 has no equivalent; use SHARDED_STATE_DICT",
        )
    return choice("state_dict_type", value, STATE_DICT_TYPES, {1: "FULL_STATE_DICT", 3: "SHARDED_STATE_DICT"})


def _ignored_modules(value: Any) -> tuple[str, ...] | None:
    modules = name_list("ignored_modules", value, comma_separated=False)
    for pattern in modules or ():
        try:
            re.compile(pattern)
        except re.error as err:
            raise invalid("ignored_modules", pattern, "module names or valid regular expressions", str(err)) from None
    return modules


# In the order they run: the version first, since the rules after it depend on it.
_FIELD_CHECKS: tuple[tuple[str, Callable[[Any], Any]], ...] = (
    ("fsdp_version", _version),
    ("sharding_strategy", _strategy),
    ("reshard_after_forward", _reshard),
    ("backward_prefetch", _prefetch),
    *((name, _bool(name)) for name in BOOL_FIELDS),
    ("auto_wrap_policy", _policy),
    ("transformer_cls_names_to_wrap", _cls_names),
    ("min_num_params", _min_num_params),
    ("mixed_precision", mixed_precision_of),
    ("state_dict_type", _state_dict_type),
    ("ignored_modules", _ignored_modules),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FSDPConfig:
    """How to shard a model with FSDP1 or FSDP2; names follow Accelerate's FSDP plugin."""

    fsdp_version: int = 2
    """1: FSDP1 (`FullyShardedDataParallel`, one FlatParameter per wrapped module).
    2: FSDP2 (`fully_shard`, one DTensor per parameter)."""
    reshard_after_forward: bool | int | str | None = None
    """FSDP2: free the gathered parameters after forward (True) or keep them until backward
    (False); an int n reshards to n ranks, trading memory for a smaller backward all-gather.
    None means True. A sharding-strategy name is converted like `sharding_strategy`. With
    FSDP1 this field is folded into `sharding_strategy` (True: FULL_SHARD, False: SHARD_GRAD_OP)."""
    sharding_strategy: str | int | None = None
    """FSDP1's strategy: FULL_SHARD, SHARD_GRAD_OP, NO_SHARD, HYBRID_SHARD, HYBRID_SHARD_ZERO2
    (or torch's values 1-5). None means FULL_SHARD. With FSDP2 it is converted to
    `reshard_after_forward` with a FutureWarning."""
    backward_prefetch: str | None = "BACKWARD_PRE"
    """FSDP1 only: BACKWARD_PRE, BACKWARD_POST, or NO_PREFETCH / None. FSDP2 always behaves
    like BACKWARD_PRE, the setting that overlaps the next all-gather with gradient compute."""
    forward_prefetch: bool = False
    """Gather the next module's parameters during this module's forward. FSDP2 too:
    fsdp_nb uses torch's `set_modules_to_forward_prefetch` (Accelerate rejects it there)."""
    auto_wrap_policy: str | Callable | None = "NO_WRAP"
    """TRANSFORMER_BASED_WRAP, SIZE_BASED_WRAP, NO_WRAP (None), or a torch wrap-policy callable."""
    transformer_cls_names_to_wrap: tuple[str, ...] | None = None
    """Class names wrapped by TRANSFORMER_BASED_WRAP (a list or a comma-separated string)."""
    min_num_params: int = 100_000_000
    """SIZE_BASED_WRAP wraps modules with at least this many parameters (Accelerate's default 1e8)."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and optimizer step on the CPU."""
    mixed_precision: MixedPrecision | str | Mapping | tuple | None = None
    """'no' (None), 'bf16', 'fp16', or explicit dtypes. Presets reduce gradients in fp32.
    Stored as a `MixedPrecision` or None."""
    activation_checkpointing: bool = False
    """Recompute each wrapped block's activations in backward instead of storing them."""
    state_dict_type: str = "SHARDED_STATE_DICT"
    """SHARDED_STATE_DICT (each rank saves its own shard, no communication) or
    FULL_STATE_DICT (gathered to rank 0). LOCAL_STATE_DICT is obsolete and rejected."""
    cpu_ram_efficient_loading: bool = False
    """Only rank 0 loads the weights; the other ranks start empty and receive a broadcast."""
    use_orig_params: bool = True
    """FSDP1: expose the original parameters as views into the FlatParameter (needed for
    partial freezing and per-parameter optimizer groups). FSDP2 always does."""
    sync_module_states: bool = False
    """FSDP1: broadcast rank 0's parameters and buffers at wrap time. Redundant in FSDP2."""
    ignored_modules: tuple[str, ...] | None = None
    """Modules FSDP leaves unsharded, by qualified name or regex (full match); a string or a list."""

    def __post_init__(self):
        for name, check in _FIELD_CHECKS:
            object.__setattr__(self, name, check(getattr(self, name)))
        self._resolve_resharding()
        self._apply_version_rules()
        names = self.transformer_cls_names_to_wrap
        if names and self.auto_wrap_policy != "TRANSFORMER_BASED_WRAP":
            warn_user(
                f"transformer_cls_names_to_wrap={list(names)} is ignored: auto_wrap_policy is "
                f"{self.auto_wrap_policy!r}, not 'TRANSFORMER_BASED_WRAP'",
                UserWarning,
            )

    # ---- the rules that tie fields together ----------------------------------------
    def _resolve_resharding(self) -> None:
        """Fold the two resharding fields into the one this version uses [Note: one resharding field per version]."""
        strategy, reshard = self.sharding_strategy, self.reshard_after_forward
        if self.fsdp_version == 1:
            object.__setattr__(self, "sharding_strategy", _fsdp1_strategy(strategy, reshard))
            object.__setattr__(self, "reshard_after_forward", None)
        else:
            object.__setattr__(self, "reshard_after_forward", _fsdp2_reshard(strategy, reshard))
            object.__setattr__(self, "sharding_strategy", None)

    def _apply_version_rules(self) -> None:
        """The 'removed in FSDP2' rows of the migration table, and FSDP1's loading rule."""
        if self.fsdp_version == 1:
            if self.cpu_ram_efficient_loading and not self.sync_module_states:
                warn_user(
                    "sync_module_states=False is set to True: with FSDP1, cpu_ram_efficient_loading "
                    "needs rank 0's weights broadcast at wrap time",
                    UserWarning,
                )
                object.__setattr__(self, "sync_module_states", True)
            return
        for name, (fsdp2_value, why) in IGNORED_IN_FSDP2.items():
            if getattr(self, name) != fsdp2_value:
                warn_user(f"{name}={getattr(self, name)!r} is ignored with fsdp_version=2: {why}", UserWarning)
                object.__setattr__(self, name, fsdp2_value)

    def validate_for_world(self, world_size: int) -> None:
        """Checks that need the world size; raises ValueError naming the field."""
        if not is_int(world_size) or world_size < 1:
            raise invalid("world_size", world_size, "an int >= 1")
        n = self.reshard_after_forward
        if is_int(n):
            divisors = [d for d in range(2, world_size) if world_size % d == 0]
            if n not in divisors:
                problem = "does not divide" if world_size % n else "is not smaller than"
                use = (
                    f"True, False or a divisor of {world_size} in {divisors}"
                    if divisors
                    else f"True or False ({world_size} has no divisor strictly between 1 and {world_size})"
                )
                raise ValueError(f"reshard_after_forward={n} {problem} world size {world_size}; use {use}")

    # ---- other ways in, and out ----------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FSDPConfig:
        """Build from a dict of field names; an unknown key raises ValueError with close matches."""
        if not isinstance(d, Mapping):
            raise invalid("FSDPConfig.from_dict argument", d, "a dict of FSDPConfig field names")
        unknown = _unknown_field(d)
        if unknown:
            raise ValueError(unknown)
        return cls(**d)

    @classmethod
    def from_accelerate(cls, config: Mapping[str, Any]) -> FSDPConfig:
        """Build from a parsed `accelerate config` YAML dict; ValueError names the YAML key at fault."""
        return _build(fields_from_yaml(config), YAML_NAMES)

    @classmethod
    def from_accelerate_yaml(cls, path: str | os.PathLike) -> FSDPConfig:
        """Read an `accelerate config` YAML file; any problem is one ValueError line naming the file."""
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except OSError as err:
            raise ValueError(f"{path}: cannot read the file ({err.strerror or err})") from None
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
        if data is None:
            raise ValueError(f"{path}: the file is empty; expected an Accelerate config with an fsdp_config section")
        try:
            return cls.from_accelerate(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FSDPConfig:
        """Read the FSDP_* variables that `accelerate launch` sets (default: os.environ)."""
        return _build(fields_from_env(os.environ if environ is None else environ), ENV_NAMES)

    def to_accelerate(self) -> dict[str, Any]:
        """This config as an Accelerate YAML dict (`distributed_type`, `mixed_precision`, `fsdp_config`)."""
        return accelerate_dict(self)


def _fsdp1_strategy(strategy: str | None, reshard: bool | int | str | None) -> str:
    if is_int(reshard):
        raise invalid(
            "reshard_after_forward",
            reshard,
            "True, False or a sharding-strategy name",
            "resharding to a smaller world is FSDP2 only; set fsdp_version=2",
        )
    from_reshard = {True: "FULL_SHARD", False: "SHARD_GRAD_OP"}.get(reshard, reshard)
    if strategy is not None and from_reshard is not None:
        agree = STRATEGY_TO_RESHARD[strategy] == reshard if isinstance(reshard, bool) else strategy == reshard
        if not agree:
            raise ValueError(
                f"sharding_strategy={strategy!r} and reshard_after_forward={reshard!r} disagree; "
                "with fsdp_version=1 set only sharding_strategy"
            )
    return strategy or from_reshard or "FULL_SHARD"


def _fsdp2_reshard(strategy: str | None, reshard: bool | int | str | None) -> bool | int:
    if isinstance(reshard, str):  # Accelerate's FSDP1 YAML keeps the strategy name in this key
        if strategy is not None and strategy != reshard:
            raise ValueError(
                f"sharding_strategy={strategy!r} and reshard_after_forward={reshard!r} disagree; "
                "with fsdp_version=2 set only reshard_after_forward=True or False"
            )
        strategy, reshard = reshard, None
    if strategy is None:
        return True if reshard is None else reshard
    converted = STRATEGY_TO_RESHARD[strategy]
    if reshard is not None and reshard != converted:
        raise ValueError(
            f"sharding_strategy={strategy!r} means reshard_after_forward={converted} but "
            f"reshard_after_forward={reshard!r} was given; with fsdp_version=2 set only "
            "reshard_after_forward"
        )
    warn_user(
        f"sharding_strategy={strategy!r} is FSDP1's option; with fsdp_version=2 it becomes "
        f"reshard_after_forward={converted}. {STRATEGY_NOTES.get(strategy, '')}"
        "Set reshard_after_forward instead.",
        FutureWarning,
    )
    return converted


def _build(kwargs: dict[str, Any], source_names: Mapping[str, str]) -> FSDPConfig:
    """FSDPConfig(**kwargs), with the Accelerate name of the failing field in front of its error."""
    try:
        return FSDPConfig(**kwargs)
    except ValueError as err:
        field = str(err).split("=", 1)[0].split(".", 1)[0]
        prefix = f"{source_names[field]}: " if field in source_names and source_names[field] != field else ""
        raise ValueError(f"{prefix}{err}") from None


def _unknown_field(kwargs: Mapping[str, Any]) -> str | None:
    """The message for the first key that is not an FSDPConfig field, or None."""
    names = [f.name for f in dataclasses.fields(FSDPConfig)]
    for key in kwargs:
        if key not in names:
            return f"unknown FSDPConfig field {key!r}{_did_you_mean(str(key), names)}; accepted: {', '.join(names)}"
    return None


def _friendly_init(init):
    # The generated __init__ says only "unexpected keyword argument"; name the fix too.
    def __init__(self, **kwargs):
        unknown = _unknown_field(kwargs)
        if unknown:
            raise TypeError(unknown)
        init(self, **kwargs)

    __init__.__doc__, __init__.__wrapped__ = init.__doc__, init
    return __init__


FSDPConfig.__init__ = _friendly_init(FSDPConfig.__init__)


def _did_you_mean(key: str, names: list[str]) -> str:
    if key in YAML_KEY_TO_FIELD:  # an Accelerate YAML key: name its field exactly
        return f" (that is Accelerate's YAML key; the field is {YAML_KEY_TO_FIELD[key]!r})"
    candidates = [key, key.removeprefix("fsdp_")]
    close = [m for c in candidates for m in difflib.get_close_matches(c, names, n=3, cutoff=0.6)]
    close = list(dict.fromkeys(close))
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
