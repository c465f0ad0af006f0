"""`fsdp-nb to-fsdp2`: the FSDP1 -> FSDP2 rules of `accelerate to-fsdp2`, applied to a YAML document.

The rules themselves (which keys FSDP2 removed, how a sharding strategy becomes
`reshard_after_forward`) are rows of the table in `fsdp_nb.accelerate`; this module
applies them to a config file's contents and says what it changed, and why.

It keeps `accelerate to-fsdp2`'s mapping, and fixes what that command loses:
- comments and key order: a document read with ruamel.yaml's round-trip loader
  (`load_yaml`) keeps every comment, and keys are renamed where they stand;
- numeric strategies (`fsdp_sharding_strategy: 2`, torch's enum values 1-5)
  become the bool FSDP2 reads, instead of being copied into a boolean field;
- hybrid strategies (HYBRID_SHARD, HYBRID_SHARD_ZERO2, 4, 5) are converted with a
  note that FSDP2 expresses hybrid sharding through a 2-D mesh, naming the key to
  add (`parallelism_config_dp_replicate_size` under `parallelism_config:`);
- the legacy `fsdp_backward_prefetch_policy` key is dropped like
  `fsdp_backward_prefetch`, instead of being carried into the FSDP2 config;
- a file it cannot convert faithfully (wrong types, an unknown fsdp_version, YAML
  Accelerate's reader cannot read) is one ValueError line, never a traceback or a
  silently different config (`convert_file_text`).
Pure apart from `load_yaml` / `dump_yaml`: a document in, a new document out.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping
from collections.abc import Set as AbstractSet
from typing import Any

from fsdp_nb.accelerate import (
    LEGACY_YAML_KEYS,
    REMOVED_IN_FSDP2,
    RENAMED_IN_FSDP2,
    SHARDING_STRATEGIES,
    STRATEGY_NOTES,
    STRATEGY_TO_RESHARD,
    accelerate_dict,
)
from fsdp_nb.config import FSDPConfig
from fsdp_nb.yaml_text import (
    check_accelerate_reads,
    containers,
    described_keys,
    drop_key,
    dump_yaml,
    load_yaml,
    own_items,
    read_document,
    rename_key,
    yaml_problem,
)

# accelerate_dict has been public here since the first release; its home is fsdp_nb.accelerate.
__all__ = [
    "accelerate_dict",
    "config_from_accelerate",
    "config_from_env",
    "convert_file_text",
    "convert_to_fsdp2",
    "dump_yaml",
    "load_yaml",
    "reshard_value",
]

# Every key the conversion drops, with what it says: FSDP2's removed keys and their legacy spellings.
_DROPPED = REMOVED_IN_FSDP2 | {
    old: f"legacy spelling of {new}; {REMOVED_IN_FSDP2[new]}"
    for old, new in LEGACY_YAML_KEYS.items()
    if new in REMOVED_IN_FSDP2
}


def config_from_accelerate(config: Mapping[str, Any]) -> FSDPConfig:
    """An `FSDPConfig` from a parsed Accelerate YAML dict (same as `FSDPConfig.from_accelerate`)."""
    return FSDPConfig.from_accelerate(config)


def config_from_env(environ: Mapping[str, str]) -> FSDPConfig:
    """An `FSDPConfig` from `accelerate launch`'s variables (same as `FSDPConfig.from_env`)."""
    return FSDPConfig.from_env(environ)


def convert_file_text(data: bytes) -> tuple[str, list[str]]:
    """The FSDP2 YAML text for the bytes of an Accelerate config file, and the change notes.

    Any problem is one ValueError line that says what is wrong and what to do; the
    caller adds the file's name. Before it returns, the result is read back the way
    Accelerate reads it (PyYAML) and compared with the same rules applied to what
    Accelerate reads from the input: the comment-keeping round trip never changes
    a value that the rules did not.
    """
    import yaml

    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"not UTF-8 text (byte {data[err.start]:#04x} on line {line}); give a YAML file saved as UTF-8"
        ) from None
    try:
        document = read_document(text)
        try:
            plain = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(
                f"Accelerate's YAML reader (PyYAML) cannot read it ({yaml_problem(err, text)}); "
                "write that part in plain YAML (no custom tags or complex keys) and run again"
            ) from None
        new, notes = convert_to_fsdp2(document)
        new_text = dump_yaml(new)
        check_accelerate_reads(new_text, convert_to_fsdp2(plain)[0])
    except RecursionError:  # both YAML readers recurse once per level
        raise ValueError("nested too deeply to read; flatten its deepest lists or mappings and run again") from None
    return new_text, notes


def reshard_value(key: str, value: Any) -> tuple[Any, str | None]:
    """FSDP2's `fsdp_reshard_after_forward` for an FSDP1 strategy value, and a note on what changed.

    Names and torch's enum values (1-5, as ints or digit strings) both map through
    the table; bools are already FSDP2 values; any other scalar is copied with a note.
    A list or mapping is a ValueError: copied, it would make an FSDP2 config no reader accepts.
    """
    if isinstance(value, bool):
        return value, None
    if isinstance(value, Collection) and not isinstance(value, str):
        raise ValueError(
            f"fsdp_config.{key} is {_shown(value)}, not a sharding strategy; accepted: "
            f"{', '.join(SHARDING_STRATEGIES)}, their numbers 1-5, or true/false; fix it and run again"
        )
    name = value.strip().upper() if isinstance(value, str) else None
    number = int(value) if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()) else None
    if number is not None:
        if not 1 <= number <= len(SHARDING_STRATEGIES):
            return value, f"{key}: {value!r} is not a sharding strategy (1-5) or a bool; copied unchanged"
        name = SHARDING_STRATEGIES[number - 1]
    if name not in STRATEGY_TO_RESHARD:
        return value, f"{key}: {value!r} is not a sharding strategy or a bool; copied unchanged"
    new = STRATEGY_TO_RESHARD[name]
    shown = f"{value} ({name})" if number is not None else str(value)
    lost = STRATEGY_NOTES.get(name, "").strip()
    target = RENAMED_IN_FSDP2[key]
    return new, f"{key}: {shown} -> {target}: {str(new).lower()}" + (f" ({lost})" if lost else "")


def convert_to_fsdp2(config: Mapping[str, Any]) -> tuple[Any, list[str]]:
    """Apply `accelerate to-fsdp2`'s rules to a YAML document; returns (new document, change notes).

    The input is not modified. Keys the rules do not know are carried over unchanged,
    in place; a config with no fsdp_config (or `fsdp_config: {}`), or already at
    fsdp_version 2, comes back as it was. A ruamel round-trip document keeps its comments.
    ValueError (one line) where the rules cannot apply: an fsdp_config that is not a
    mapping, an fsdp_version other than 1 or 2, a list or mapping as a sharding strategy.
    """
    # Accelerate passes `fsdp_config: 3` or `[a, b]` to `.get` and crashes, and passes `[]` or `false`
    # through as "no section"; fsdp_nb names the wrong type instead, whatever its truth value.
    block = config.get("fsdp_config")
    if block is not None and not isinstance(block, Mapping):
        raise ValueError(
            f"fsdp_config is {_shown(block)}, not a mapping of fsdp_* keys; write it as `fsdp_config:` "
            "followed by indented `fsdp_...: value` lines, or remove it"
        )
    merged = next((node for node in containers(config) if getattr(node, "merge", None)), None)
    if merged is not None:  # ruamel.yaml's deepcopy writes a merge key's keys out twice
        raise ValueError(
            f"line {merged.lc.line + 1} takes keys from a YAML merge key (<<: *anchor), which cannot be copied "
            "faithfully; write those keys out in place and run again"
        )
    if not block:
        return copy.deepcopy(config), ["no fsdp_config section: nothing to convert"]
    version = _fsdp_version(block.get("fsdp_version"))
    new = copy.deepcopy(config)
    block = new["fsdp_config"]
    if sum(child is block for node in containers(new) for _, child in own_items(node)) > 1:
        block = new["fsdp_config"] = _own_copy(block)  # an alias (`fsdp_config: *defaults`): leave its anchor as is
    if version == 2:
        return new, [
            "fsdp_version is already 2: nothing converted (if the file still uses FSDP1 keys, "
            "set fsdp_version: 1 and run the conversion again)"
        ]
    notes: list[str] = []
    described = described_keys(block)  # before any edit moves a comment
    converted: set[str] = set()  # target keys written so far, in the order they were met
    for key in list(block):
        if key not in block or key in converted:
            continue  # an earlier key took its place, or this key was converted with it (see below)
        value = block[key]
        if key in _DROPPED:
            notes.append(f"{key}: dropped, {_DROPPED[key]}")
            if key == "fsdp_forward_prefetch" and value is True:
                notes.append(
                    "fsdp_forward_prefetch: fsdp_nb does implement it for FSDP2; "
                    "add `fsdp_forward_prefetch: true` back to use it with fsdp_nb"
                )
            drop_key(block, key, key in described)
            continue
        if key not in RENAMED_IN_FSDP2:
            if key == "fsdp_state_dict_type" and str(value).upper() == "LOCAL_STATE_DICT":
                notes.append(
                    "fsdp_state_dict_type: LOCAL_STATE_DICT copied unchanged, but FSDP2 has no "
                    "equivalent; change it to SHARDED_STATE_DICT"
                )
            continue
        target = RENAMED_IN_FSDP2[key]
        new_value, note = reshard_value(key, value)
        if note:
            notes.append(note)
        if target in converted:  # an earlier key already wrote the target: the later key wins, as in Accelerate
            if block[target] != new_value:
                notes.append(
                    f"{target}: {block[target]!r} from an earlier key replaced by {new_value!r} "
                    f"from {key} (the later key wins)"
                )
            block[target] = new_value
            drop_key(block, key, key in described)
            continue
        if target != key and target in block:  # the target comes later: convert it here, where the first key stands
            later_value, later_note = reshard_value(target, block[target])
            if later_note:
                notes.append(later_note)
            if later_value != new_value:
                notes.append(
                    f"{target}: {new_value!r} from {key} replaced by {later_value!r} from {target} (the later key wins)"
                )
            new_value = later_value
            drop_key(block, target, target in described)
        rename_key(block, key, target, new_value)
        converted.add(target)
    block["fsdp_version"] = 2  # in place if present, else appended, as in Accelerate
    slot = getattr(new, "ca", None) and new.ca.items.get("fsdp_config")
    if slot and slot[3] is not None and getattr(block, "ca", None) is not None:
        slot[3] = (block.ca.comment or [None, None])[1] or []  # ruamel prints the block's first lines from here
    notes.append("fsdp_version: set to 2")
    return new, notes


def _fsdp_version(value) -> int:
    """1 or 2 from an fsdp_version value (missing or null means 1, as in Accelerate); ValueError otherwise."""
    if value is None:
        return 1
    if isinstance(value, int) and not isinstance(value, bool) and value in (1, 2):
        return value
    if isinstance(value, str) and value.strip() in ("1", "2"):  # `accelerate launch` passes str(value) on
        return int(value)
    raise ValueError(
        f"fsdp_config.fsdp_version is {_shown(value)}; accepted: 1 (an FSDP1 config, which is converted) "
        "or 2 (already FSDP2); set it to 1 and run again"
    )


def _shown(value) -> str:
    """A value as an error message names it: a scalar as written, a collection by its kind."""
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, Collection) and not isinstance(value, str):
        return "a set" if isinstance(value, AbstractSet) else "a list"
    return "empty" if value is None else repr(value)


def _own_copy(block):
    """A deep copy of a mapping reached through an alias, without its anchor, so it is written out in full."""
    fresh = copy.deepcopy(block)
    if getattr(fresh, "anchor", None) is not None:
        fresh.anchor.value = None
    return fresh
