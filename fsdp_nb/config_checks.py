"""FSDPConfig's field checks and its resharding rules, one function each [Note: table-driven validation].

`FIELD_CHECKS` lists, in the order `FSDPConfig.__post_init__` runs them, one function
per field that returns the field's canonical value or raises ValueError naming the
field, the value and the accepted values. `fsdp1_strategy` and `fsdp2_reshard` fold
FSDP1's `sharding_strategy` and FSDP2's `reshard_after_forward` into the one field each
version uses. Pure: values in, values out (and FutureWarnings attributed to the user's line).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from typing import Any

from fsdp_nb.accelerate import (
    AUTO_WRAP_POLICIES,
    BACKWARD_PREFETCH,
    BOOL_FIELDS,
    FSDP_VERSIONS,
    SHARDING_STRATEGIES,
    STATE_DICT_TYPES,
    STRATEGY_NOTES,
    STRATEGY_TO_RESHARD,
)
from fsdp_nb.precision import mixed_precision_of
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


def _size(field: str, *, optional: bool = False) -> Callable[[Any], int | None]:
    """A mesh size: an int >= 1 (None too for `dp_shard_size`: resolved against the world in `shard()`)."""

    def check(value: Any) -> int | None:
        if value is None and optional:
            return None
        if not is_int(value) or value < 1:
            raise invalid(
                field, value, "an int >= 1" + (", or None (world / (dp_replicate_size × tp_size))" if optional else "")
            )
        return value

    return check


def _ignored_modules(value: Any) -> tuple[str, ...] | None:
    modules = name_list("ignored_modules", value, comma_separated=False)
    for pattern in modules or ():
        try:
            re.compile(pattern)
        except re.error as err:
            raise invalid("ignored_modules", pattern, "module names or valid regular expressions", str(err)) from None
    return modules


# In the order they run: the version first, since the rules after it depend on it.
FIELD_CHECKS: tuple[tuple[str, Callable[[Any], Any]], ...] = (
    ("fsdp_version", _version),
    ("sharding_strategy", _strategy),
    ("reshard_after_forward", _reshard),
    ("dp_replicate_size", _size("dp_replicate_size")),
    ("dp_shard_size", _size("dp_shard_size", optional=True)),
    ("tp_size", _size("tp_size")),
    ("backward_prefetch", _prefetch),
    *((name, _bool(name)) for name in BOOL_FIELDS),
    ("auto_wrap_policy", _policy),
    ("transformer_cls_names_to_wrap", _cls_names),
    ("min_num_params", _min_num_params),
    ("mixed_precision", mixed_precision_of),
    ("state_dict_type", _state_dict_type),
    ("ignored_modules", _ignored_modules),
)


def fsdp1_strategy(strategy: str | None, reshard: bool | int | str | None) -> str:
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


def fsdp2_reshard(strategy: str | None, reshard: bool | int | str | None, *, replicate: int = 1) -> bool | int:
    """FSDP2's `reshard_after_forward`; a strategy name is converted with a FutureWarning. The note on
    hybrid strategies (a 2-D mesh, `dp_replicate_size`) is left out when `replicate` > 1 already says it."""
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
    note = "" if replicate > 1 and strategy.startswith("HYBRID") else STRATEGY_NOTES.get(strategy, "")
    warn_user(
        f"sharding_strategy={strategy!r} is FSDP1's option; with fsdp_version=2 it becomes "
        f"reshard_after_forward={converted}. {note}"
        "Set reshard_after_forward instead.",
        FutureWarning,
    )
    return converted
