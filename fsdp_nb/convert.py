"""`fsdp-nb to-fsdp2`: the FSDP1 -> FSDP2 rules of `accelerate to-fsdp2`, applied to a YAML dict.

The rules themselves (which keys FSDP2 removed, how a sharding strategy becomes
`reshard_after_forward`) are rows of the table in `fsdp_nb.accelerate`; this module
applies them to a config file's contents and says what it changed, and why.
Pure: dicts in, dicts out. Reading and writing files happens in `cli.py`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from fsdp_nb.accelerate import (
    REMOVED_IN_FSDP2,
    RENAMED_IN_FSDP2,
    STRATEGY_NOTES,
    STRATEGY_TO_RESHARD,
    accelerate_dict,  # noqa: F401 (public here since the first release)
)
from fsdp_nb.config import FSDPConfig


def config_from_accelerate(config: Mapping[str, Any]) -> FSDPConfig:
    """An `FSDPConfig` from a parsed Accelerate YAML dict (same as `FSDPConfig.from_accelerate`)."""
    return FSDPConfig.from_accelerate(config)


def config_from_env(environ: Mapping[str, str]) -> FSDPConfig:
    """An `FSDPConfig` from `accelerate launch`'s variables (same as `FSDPConfig.from_env`)."""
    return FSDPConfig.from_env(environ)


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
        return new, [
            "fsdp_version is already 2: nothing converted (if the file still uses FSDP1 keys, "
            "set fsdp_version: 1 and run the conversion again)"
        ]
    converted: dict[str, Any] = {}
    notes: list[str] = []
    for key, value in block.items():
        if key in REMOVED_IN_FSDP2:
            notes.append(f"{key}: dropped, {REMOVED_IN_FSDP2[key]}")
            if key == "fsdp_forward_prefetch" and value is True:
                notes.append(
                    "fsdp_forward_prefetch: fsdp_nb does implement it for FSDP2; "
                    "add `fsdp_forward_prefetch: true` back to use it with fsdp_nb"
                )
            continue
        if key not in RENAMED_IN_FSDP2:
            converted[key] = value
            if key == "fsdp_state_dict_type" and str(value).upper() == "LOCAL_STATE_DICT":
                notes.append(
                    "fsdp_state_dict_type: LOCAL_STATE_DICT copied unchanged, but FSDP2 has no "
                    "equivalent; change it to SHARDED_STATE_DICT"
                )
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
            notes.append(
                f"{new_key}: {converted[new_key]!r} from an earlier key replaced by {new_value!r} "
                f"from {key} (the later key wins)"
            )
        converted[new_key] = new_value
    converted["fsdp_version"] = 2
    notes.append("fsdp_version: set to 2")
    new["fsdp_config"] = converted
    return new, notes
