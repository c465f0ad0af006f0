"""Field checks shared by fsdp_nb's configs: one error shape, naming field, value and accepted values."""
from __future__ import annotations

import enum
from typing import Any, Mapping

# Accelerate's `str_to_bool` words.
TRUE_WORDS = ("y", "yes", "t", "true", "on", "1")
FALSE_WORDS = ("n", "no", "f", "false", "off", "0")


def invalid(field: str, value: Any, accepted: str, why: str = "") -> ValueError:
    """The one error shape of this module: field, bad value, accepted values."""
    why = f" ({why})" if why else ""
    return ValueError(f"{field}={value!r} is not valid{why}; accepted: {accepted}")


def choice(field: str, value: Any, names: tuple[str, ...], by_int: Mapping[int, str] | None = None) -> str:
    """Canonical upper-case name: a name in any case, a torch enum member, or its torch int value."""
    raw, by_int = value, by_int or {}
    if isinstance(value, enum.Enum):
        value = value.name.lstrip("_")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value in by_int:
        return by_int[value]
    if isinstance(value, str) and value.strip().upper() in names:
        return value.strip().upper()
    ints = f" or the ints {sorted(by_int)}" if by_int else ""
    raise invalid(field, raw, ", ".join(names) + ints)


def parse_bool(field: str, text: str) -> bool:
    """Accelerate's truth words (its `str_to_bool`), case-insensitive."""
    word = str(text).strip().lower()
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise invalid(field, text, ", ".join(TRUE_WORDS + FALSE_WORDS))


def check_bool(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise invalid(field, value, "True or False")


def name_list(field: str, value: Any, *, comma_separated: bool) -> tuple[str, ...] | None:
    """None, one string (split on commas when asked), or an iterable of strings -> a tuple."""
    if value is None:
        return None
    raw = value
    if isinstance(value, str):
        value = value.split(",") if comma_separated else [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
        also = " or a comma-separated string" if comma_separated else ""
        raise invalid(field, raw, f"a list of non-empty strings{also}")
    return tuple(v.strip() for v in value)
