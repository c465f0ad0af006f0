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
`__post_init__` runs `FIELD_CHECKS` (config_checks.py) in order: one function per field that returns
the field's canonical value or raises ValueError naming field, value and accepted
values. Only then come the rules that tie fields together (the resharding pair,
the FSDP2 migration), each a method of its own.

The mesh sizes (`dp_replicate_size`, `dp_shard_size`, `tp_size`) are checked here as far as
they can be without a world; `validate_for_world` and `shard()` resolve them against one
(fsdp_nb.parallelism, [Note: mesh sizes]).

This module is pure: no process state. Accelerate's names live in accelerate.py,
dtype handling in precision.py, the shared field checks in validate.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable, Mapping
from typing import Any

from fsdp_nb.accelerate import (
    ENV_NAMES,
    IGNORED_IN_FSDP2,
    YAML_KEY_TO_FIELD,
    YAML_NAMES,
    accelerate_dict,
    fields_from_env,
    fields_from_yaml,
)
from fsdp_nb.config_checks import FIELD_CHECKS, fsdp1_strategy, fsdp2_reshard
from fsdp_nb.parallelism import KEY_TO_FIELD as MESH_KEY_TO_FIELD
from fsdp_nb.parallelism import plan_mesh
from fsdp_nb.precision import MixedPrecision
from fsdp_nb.validate import (
    invalid,
    warn_user,
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
    `reshard_after_forward` with a FutureWarning. The hybrid strategies shard within a row of a
    2-D (replicate, shard) mesh and replicate down its columns (see `dp_replicate_size`)."""
    dp_replicate_size: int = 1
    """R, copies of each shard (Accelerate's `parallelism_config_dp_replicate_size`). FSDP2: R > 1 is
    HSDP on an (R, S) mesh with dim names ("dp_replicate", "dp_shard"). FSDP1: needs a hybrid
    `sharding_strategy`, which without it takes R from the nodes (world / LOCAL_WORLD_SIZE), as FSDP1 does."""
    dp_shard_size: int | None = None
    """S, ranks that split each parameter between them. None: world / (R·T), resolved in `shard()`."""
    tp_size: int = 1
    """T, ranks of one tensor-parallel group; FSDP2 only. R·S·T is the world size. With T > 1,
    `shard()` applies the model's `base_model_tp_plan` (or its `tp_plan=`) before FSDP2."""
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
        for name, check in FIELD_CHECKS:
            object.__setattr__(self, name, check(getattr(self, name)))
        self._resolve_resharding()
        self._apply_version_rules()
        self._check_mesh_sizes()
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
            object.__setattr__(self, "sharding_strategy", fsdp1_strategy(strategy, reshard))
            object.__setattr__(self, "reshard_after_forward", None)
        else:
            reshard = fsdp2_reshard(strategy, reshard, replicate=self.dp_replicate_size)
            object.__setattr__(self, "reshard_after_forward", reshard)
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

    def _check_mesh_sizes(self) -> None:
        """What the sizes cannot be with this version, before any world is known [Note: mesh sizes]."""
        if self.fsdp_version == 1 and self.tp_size > 1:
            raise ValueError(
                f"tp_size={self.tp_size} is not valid with fsdp_version=1 (FSDP1 does not compose with tensor "
                "parallelism); accepted: tp_size=1, or fsdp_version=2"
            )
        if self.fsdp_version == 1 and self.dp_replicate_size > 1 and not self.sharding_strategy.startswith("HYBRID"):
            raise ValueError(
                f"dp_replicate_size={self.dp_replicate_size} with fsdp_version=1 needs sharding_strategy="
                f"'HYBRID_SHARD' or 'HYBRID_SHARD_ZERO2' (FSDP1 replicates only in its hybrid strategies), "
                f"not {self.sharding_strategy!r}; set one of them, or use fsdp_version=2"
            )

    def validate_for_world(self, world_size: int, local_world_size: int | None = None) -> None:
        """Checks that need the world size (and the ranks per node, default all); raises one ValueError line.

        The mesh sizes must multiply to the world size, and an int `reshard_after_forward`
        must divide the shard group (`fsdp_nb.parallelism.plan_mesh`, which `shard()` runs too).
        """
        plan_mesh(self, world_size, local_world_size=local_world_size)

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
    known = YAML_KEY_TO_FIELD | MESH_KEY_TO_FIELD
    if key in known:  # an Accelerate YAML key: name its field exactly
        return f" (that is Accelerate's YAML key; the field is {known[key]!r})"
    candidates = [key, key.removeprefix("fsdp_")]
    close = [m for c in candidates for m in difflib.get_close_matches(c, names, n=3, cutoff=0.6)]
    close = list(dict.fromkeys(close))
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
