"""Field checks shared by fsdp_nb's configs: one error shape, naming field, value and accepted values."""

from __future__ import annotations

import dataclasses
import enum
import os
import sys
import warnings
from collections.abc import Mapping
from typing import Any

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

# Accelerate's `str_to_bool` words.
TRUE_WORDS = ("y", "yes", "t", "true", "on", "1")
FALSE_WORDS = ("n", "no", "f", "false", "off", "0")


def is_int(value: Any) -> bool:
    """An int that is not a bool: `True` passes `isinstance(True, int)`, and no config means it as 1."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def warn_user(message: str, category: type[Warning]) -> None:
    """`warnings.warn` attributed to the user's line: the first frame outside fsdp_nb.

    A fixed stacklevel cannot do it: a config is built by the user, by a classmethod
    (`from_accelerate_yaml`), by `dataclasses.replace`, and always through the
    generated `__init__` (file "<string>") and our wrapper around it.
    """
    frame, level = sys._getframe(1), 2  # stacklevel 2: our caller
    while frame is not None and _is_ours(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def _is_ours(filename: str) -> bool:
    return filename.startswith(_PACKAGE_DIR) or filename == "<string>" or filename == dataclasses.__file__


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
    if is_int(value) and value in by_int:
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
