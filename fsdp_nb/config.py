"""`FSDPConfig`: one set of FSDP options for FSDP1 and FSDP2, in Accelerate's vocabulary.

Field names follow Accelerate's `FullyShardedDataParallelPlugin`, so a user who
knows `accelerate config` knows this class. Validation follows the FSDP1 -> FSDP2
table in DESIGN.md: FSDP1-only options given with `fsdp_version=2` are converted
(with a FutureWarning) or ignored (with a UserWarning that says why).

[Note: one resharding field per version]
FSDP1 says how much to reshard with `sharding_strategy`; FSDP2 says it with
`reshard_after_forward`. After `__post_init__` exactly one of the two is set:
`sharding_strategy` for version 1, `reshard_after_forward` for version 2; the
other is None. So `dataclasses.replace(config, ...)` on a validated config never
sees a conflict, and `replace(config, fsdp_version=2)` migrates an FSDP1 config
by the table (strategy -> bool as `accelerate to-fsdp2` maps it).

This module is pure: no process state. Dtype handling lives in precision.py,
the shared field checks in validate.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import warnings
from typing import Any, Callable, Mapping

from fsdp_nb.precision import MixedPrecision, mixed_precision_of
from fsdp_nb.validate import FALSE_WORDS, TRUE_WORDS, check_bool, choice, invalid, name_list, parse_bool

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
# What the plain True/False mapping above loses, said once per strategy.
STRATEGY_NOTES = {
    "NO_SHARD": "FSDP2 has no NO_SHARD: it still shards parameters across ranks and "
    "False only keeps them gathered from forward to backward; for pure replication use DDP. ",
    "HYBRID_SHARD": "FSDP2 hybrid sharding comes from a 2-D device mesh (replicate, shard), "
    "not from this option; on a 1-D mesh it shards over all ranks. ",
    "HYBRID_SHARD_ZERO2": "FSDP2 hybrid sharding comes from a 2-D device mesh (replicate, shard), "
    "not from this option; on a 1-D mesh it shards over all ranks. ",
}
# FSDP1-only options that FSDP2 ignores: the value FSDP2 behaves as, and why.
IGNORED_IN_FSDP2 = {
    "backward_prefetch": ("BACKWARD_PRE", "FSDP2 always prefetches the next all-gather in backward, like BACKWARD_PRE"),
    "sync_module_states": (False, "it is redundant in FSDP2; cpu_ram_efficient_loading=True loads on rank 0 "
                                  "and broadcasts"),
    "use_orig_params": (True, "FSDP2 always uses the original parameters, one DTensor each"),
}  # fmt: skip
BOOL_FIELDS = ("forward_prefetch", "cpu_offload", "activation_checkpointing",
               "cpu_ram_efficient_loading", "use_orig_params", "sync_module_states")  # fmt: skip


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
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if type(self.fsdp_version) is not int or self.fsdp_version not in FSDP_VERSIONS:
            raise invalid("fsdp_version", self.fsdp_version, "1 or 2")
        strategy = self.sharding_strategy
        if strategy is not None:
            strategy = choice("sharding_strategy", strategy, SHARDING_STRATEGIES,
                               dict(enumerate(SHARDING_STRATEGIES, 1)))  # fmt: skip
        reshard = self._checked_reshard()
        if self.fsdp_version == 1:
            put("sharding_strategy", self._fsdp1_strategy(strategy, reshard))
            put("reshard_after_forward", None)
        else:
            put("reshard_after_forward", self._fsdp2_reshard(strategy, reshard))
            put("sharding_strategy", None)

        prefetch = self.backward_prefetch
        if prefetch is not None:
            prefetch = choice("backward_prefetch", prefetch, BACKWARD_PREFETCH,
                               {1: "BACKWARD_PRE", 2: "BACKWARD_POST"})  # fmt: skip
        put("backward_prefetch", None if prefetch == "NO_PREFETCH" else prefetch)
        for name in BOOL_FIELDS:
            check_bool(name, getattr(self, name))

        policy = "NO_WRAP" if self.auto_wrap_policy is None else self.auto_wrap_policy
        if not callable(policy):
            put("auto_wrap_policy", choice("auto_wrap_policy", policy, AUTO_WRAP_POLICIES))
        names = name_list("transformer_cls_names_to_wrap", self.transformer_cls_names_to_wrap, comma_separated=True)
        for name in names or ():
            if not name.isidentifier():
                raise invalid("transformer_cls_names_to_wrap", name, "Python class names such as 'Block'")
        if names and self.auto_wrap_policy != "TRANSFORMER_BASED_WRAP":
            warnings.warn(f"transformer_cls_names_to_wrap={list(names)} is ignored: auto_wrap_policy is "
                          f"{self.auto_wrap_policy!r}, not 'TRANSFORMER_BASED_WRAP'",
                          UserWarning, stacklevel=3)  # fmt: skip
        put("transformer_cls_names_to_wrap", names)
        mnp = self.min_num_params
        if isinstance(mnp, float) and mnp.is_integer():
            put("min_num_params", mnp := int(mnp))
        if type(mnp) is not int or mnp < 0:
            raise invalid("min_num_params", mnp, "an int >= 0")

        put("mixed_precision", mixed_precision_of(self.mixed_precision))
        if self.state_dict_type is not None and _is_local(self.state_dict_type):
            raise invalid("state_dict_type", self.state_dict_type, ", ".join(STATE_DICT_TYPES),
                        "LOCAL_STATE_DICT is obsolete: it saves FSDP1's flat shards, which only the same world "
                        "size and wrapping can read, and FSDP2 has no equivalent; use SHARDED_STATE_DICT")  # fmt: skip
        put("state_dict_type", choice("state_dict_type", self.state_dict_type, STATE_DICT_TYPES,
                                       {1: "FULL_STATE_DICT", 3: "SHARDED_STATE_DICT"}))  # fmt: skip
        modules = name_list("ignored_modules", self.ignored_modules, comma_separated=False)
        for pattern in modules or ():
            try:
                re.compile(pattern)
            except re.error as err:
                raise invalid("ignored_modules", pattern, "module names or valid regular expressions", str(err)) \
                    from None  # fmt: skip
        put("ignored_modules", modules)
        self._apply_version_rules()

    def _checked_reshard(self) -> bool | int | str | None:
        """Type checks that hold for both versions; a strategy name comes back upper-cased."""
        value = self.reshard_after_forward
        if value is None or isinstance(value, bool):
            return value
        accepted = f"True, False, an int >= 2 (FSDP2) or one of {', '.join(SHARDING_STRATEGIES)}"
        if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
            return parse_bool("reshard_after_forward", value)
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int):
            if value < 2:
                raise invalid("reshard_after_forward", value, accepted, "an int n reshards to n ranks: 1 is False")
            return value
        if isinstance(value, (str, enum.Enum)):
            name = value.name.lstrip("_") if isinstance(value, enum.Enum) else value.strip().upper()
            if name in SHARDING_STRATEGIES:
                return name
        raise invalid("reshard_after_forward", self.reshard_after_forward, accepted)

    def _fsdp1_strategy(self, strategy: str | None, reshard: bool | int | str | None) -> str:
        if isinstance(reshard, int) and not isinstance(reshard, bool):
            raise invalid("reshard_after_forward", reshard, "True, False or a sharding-strategy name",
                        "resharding to a smaller world is FSDP2 only; set fsdp_version=2")  # fmt: skip
        from_reshard = {True: "FULL_SHARD", False: "SHARD_GRAD_OP"}.get(reshard, reshard)
        if strategy is not None and from_reshard is not None:
            agree = STRATEGY_TO_RESHARD[strategy] == reshard if isinstance(reshard, bool) else strategy == reshard
            if not agree:
                raise ValueError(f"sharding_strategy={strategy!r} and reshard_after_forward={reshard!r} disagree; "
                                 "with fsdp_version=1 set only sharding_strategy")  # fmt: skip
        return strategy or from_reshard or "FULL_SHARD"

    def _fsdp2_reshard(self, strategy: str | None, reshard: bool | int | str | None) -> bool | int:
        if isinstance(reshard, str):  # Accelerate's FSDP1 YAML keeps the strategy name in this key
            if strategy is not None and strategy != reshard:
                raise ValueError(f"sharding_strategy={strategy!r} and reshard_after_forward={reshard!r} disagree; "
                                 "with fsdp_version=2 set only reshard_after_forward=True or False")  # fmt: skip
            strategy, reshard = reshard, None
        if strategy is None:
            return True if reshard is None else reshard
        converted = STRATEGY_TO_RESHARD[strategy]
        if reshard is not None and reshard != converted:
            raise ValueError(f"sharding_strategy={strategy!r} means reshard_after_forward={converted} but "
                             f"reshard_after_forward={reshard!r} was given; "
                             "with fsdp_version=2 set only reshard_after_forward")  # fmt: skip
        warnings.warn(f"sharding_strategy={strategy!r} is FSDP1's option; with fsdp_version=2 it becomes "
                      f"reshard_after_forward={converted}. {STRATEGY_NOTES.get(strategy, '')}"
                      "Set reshard_after_forward instead.", FutureWarning, stacklevel=4)  # fmt: skip
        return converted

    def _apply_version_rules(self) -> None:
        """The 'removed in FSDP2' rows of the migration table, and FSDP1's loading rule."""
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if self.fsdp_version == 1:
            if self.cpu_ram_efficient_loading and not self.sync_module_states:
                warnings.warn("sync_module_states=False is set to True: with FSDP1, cpu_ram_efficient_loading "
                              "needs rank 0's weights broadcast at wrap time", UserWarning, stacklevel=4)  # fmt: skip
                put("sync_module_states", True)
            return
        for name, (fsdp2_value, why) in IGNORED_IN_FSDP2.items():
            if getattr(self, name) != fsdp2_value:
                warnings.warn(f"{name}={getattr(self, name)!r} is ignored with fsdp_version=2: {why}",
                              UserWarning, stacklevel=4)  # fmt: skip
                put(name, fsdp2_value)

    def validate_for_world(self, world_size: int) -> None:
        """Checks that need the world size; raises ValueError naming the field."""
        if type(world_size) is not int or world_size < 1:
            raise invalid("world_size", world_size, "an int >= 1")
        n = self.reshard_after_forward
        if isinstance(n, int) and not isinstance(n, bool):
            divisors = [d for d in range(2, world_size) if world_size % d == 0]
            if n not in divisors:
                problem = "does not divide" if world_size % n else "is not smaller than"
                use = f"True, False or a divisor of {world_size} in {divisors}" if divisors else \
                    f"True or False ({world_size} has no divisor strictly between 1 and {world_size})"  # fmt: skip
                raise ValueError(f"reshard_after_forward={n} {problem} world size {world_size}; use {use}")

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
    def from_accelerate_yaml(cls, path: str | os.PathLike) -> FSDPConfig:
        """Read an `accelerate config` YAML file; any problem is one ValueError line naming the file."""
        import yaml

        from fsdp_nb.accelerate import config_from_accelerate

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
            return config_from_accelerate(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FSDPConfig:
        """Read the FSDP_* variables that `accelerate launch` sets (default: os.environ)."""
        from fsdp_nb.accelerate import config_from_env

        return config_from_env(os.environ if environ is None else environ)


def _is_local(value: Any) -> bool:
    if isinstance(value, enum.Enum):
        value = value.name
    return str(value).strip().upper() in ("LOCAL_STATE_DICT", "2")


def _unknown_field(kwargs: Mapping[str, Any]) -> str | None:
    """The message for the first key that is not an FSDPConfig field, or None."""
    names = [f.name for f in dataclasses.fields(FSDPConfig)]
    for key in kwargs:
        if key not in names:
            return (f"unknown FSDPConfig field {key!r}{_did_you_mean(str(key), names)}; "
                    f"accepted: {', '.join(names)}")
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
    from fsdp_nb.accelerate import YAML_KEY_TO_FIELD

    if key in YAML_KEY_TO_FIELD:  # an Accelerate YAML key: name its field exactly
        return f" (that is Accelerate's YAML key; the field is {YAML_KEY_TO_FIELD[key]!r})"
    candidates = [key, key.removeprefix("fsdp_")]
    close = [m for c in candidates for m in difflib.get_close_matches(c, names, n=3, cutoff=0.6)]
    close = list(dict.fromkeys(close))
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
