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
  note that FSDP2 expresses hybrid sharding through a 2-D mesh;
- the legacy `fsdp_backward_prefetch_policy` key is dropped like
  `fsdp_backward_prefetch`, instead of being carried into the FSDP2 config.
Pure apart from `load_yaml` / `dump_yaml`: a document in, a new document out.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Mapping
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

# accelerate_dict has been public here since the first release; its home is fsdp_nb.accelerate.
__all__ = [
    "accelerate_dict",
    "config_from_accelerate",
    "config_from_env",
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


def load_yaml(text: str):
    """Parse YAML text for conversion, keeping comments and key order (ruamel.yaml round trip)."""
    from ruamel.yaml import YAML

    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True  # 'no' stays quoted: Accelerate reads YAML 1.1, where a bare no is False
    return yaml.load(text)


def dump_yaml(document) -> str:
    """YAML text of a document from `load_yaml` (comments kept) or of a plain dict."""
    from ruamel.yaml import YAML

    yaml = YAML(typ="rt")
    indent = _mapping_indent(document)  # the file's own indentation, which its comments were written at
    yaml.indent(mapping=indent, sequence=indent + 2, offset=indent)
    yaml.representer.add_representer(str, _represent_str)
    out = io.StringIO()
    yaml.dump(document, out)
    return out.getvalue()


# Plain strings that a YAML 1.1 reader (PyYAML, which Accelerate uses) would not read back as strings.
_YAML11_WORDS = {"y", "yes", "n", "no", "on", "off", "true", "false", "null", "~", ""}


def _represent_str(representer, value: str):
    plain = value.lower() not in _YAML11_WORDS and not value.replace(".", "", 1).lstrip("-+").isdigit()
    return representer.represent_scalar("tag:yaml.org,2002:str", value, style=None if plain else "'")


def _mapping_indent(document) -> int:
    """How far the file indented its nested mappings (2 unless it says otherwise)."""
    for value in getattr(document, "values", lambda: [])():
        columns = [pos[1] for pos in getattr(getattr(value, "lc", None), "data", {}).values() if pos]
        if columns:
            return min(columns)
    return 2


def reshard_value(key: str, value: Any) -> tuple[Any, str | None]:
    """FSDP2's `fsdp_reshard_after_forward` for an FSDP1 strategy value, and a note on what changed.

    Names and torch's enum values (1-5, as ints or digit strings) both map through
    the table; bools are already FSDP2 values; anything else is copied with a note.
    """
    if isinstance(value, bool):
        return value, None
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
    in place; a config with no fsdp_config, or already at fsdp_version 2, comes back
    as it was. A ruamel round-trip document keeps its comments.
    """
    new = copy.deepcopy(config)
    block = new.get("fsdp_config") or {}
    if not block:
        return new, ["no fsdp_config section: nothing to convert"]
    if block.get("fsdp_version", 1) == 2:
        return new, [
            "fsdp_version is already 2: nothing converted (if the file still uses FSDP1 keys, "
            "set fsdp_version: 1 and run the conversion again)"
        ]
    notes: list[str] = []
    described = _described(block)  # before any edit moves a comment
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
            _drop(block, key, key in described)
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
            _drop(block, key, key in described)
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
            _drop(block, target, target in described)
        _rename(block, key, target, new_value)
        converted.add(target)
    block["fsdp_version"] = 2  # in place if present, else appended, as in Accelerate
    slot = getattr(new, "ca", None) and new.ca.items.get("fsdp_config")
    if slot and slot[3] is not None and getattr(block, "ca", None) is not None:
        slot[3] = (block.ca.comment or [None, None])[1] or []  # ruamel prints the block's first lines from here
    notes.append("fsdp_version: set to 2")
    return new, notes


# ---- editing a mapping in place, comments included ----------------------------------
# ruamel.yaml keeps the comment lines that stand before a key on the key above it,
# as the tail of that key's end-of-line comment token (`block.ca.items[key][2]`), or
# on the block itself for the first key. Dropping a key must hand those lines on.


def _rename(block, key: str, new_key: str, value: Any) -> None:
    """Replace `key: old` by `new_key: value` at the same position, keeping its comments."""
    if key == new_key:
        block[key] = value
        return
    position = list(block).index(key)
    comment = getattr(block, "ca", None) and block.ca.items.pop(key, None)
    if hasattr(block, "insert"):
        del block[key]
        block.insert(position, new_key, value)
        if comment:
            if comment[2] is not None and not comment[2].value.startswith("\n"):  # an end-of-line comment:
                shown = str(value).lower() if isinstance(value, bool) else str(value)  # keep it two spaces
                column = _indent_of(block) + len(f"{new_key}: {shown}") + 2  # after the new value
                comment = [*comment[:2], _token(comment[2].value, comment[2], column), *comment[3:]]
            block.ca.items[new_key] = comment
        return
    items = list(block.items())  # a plain dict: rebuild in order
    items[position] = (new_key, value)
    block.clear()
    block.update(items)


def _described(block) -> set[str]:
    """Keys that carry a comment, above them or at the end of their line, in the block as read."""
    ca = getattr(block, "ca", None)
    if ca is None:
        return set()
    keys, found = list(block), set()
    for i, key in enumerate(keys):
        own = ca.items.get(key, [None, None, None, None])[2]
        if own is not None and own.value.partition("\n")[0].strip():
            found.add(key)
        if i == 0:
            above = any(tok.value.strip() for tok in ((ca.comment or [None, None])[1] or []))
        else:
            held = ca.items.get(keys[i - 1], [None, None, None, None])[2]
            above = held is not None and bool(held.value.partition("\n")[2].strip())
        if above:
            found.add(key)
    return found


def _drop(block, key: str, described: bool = False) -> None:
    """Delete `key`, keeping every comment with its subject: a key that had comments (`described`:
    above it or at its end) stays as a commented-out line `# key: value  # comment`, under them."""
    ca = getattr(block, "ca", None)
    keys = list(block)
    position = keys.index(key)
    value = block.pop(key)
    if ca is None:
        return
    indent = " " * _indent_of(block)
    own_token = ca.items.pop(key, [None, None, None, None])[2]
    own, _, following = (own_token.value if own_token is not None else "").partition("\n")
    # The lines above `key` are held by the key above it (after that key's own end-of-line comment),
    # or, for the block's first key, by the block itself.
    if position == 0:
        pre = (ca.comment or [None, None])[1] or []
        leading = "".join(indent + tok.value.lstrip(" ") for tok in pre if tok.value.strip())
        head = ""
    else:
        above = ca.items.setdefault(keys[position - 1], [None, None, None, None])
        held = above[2].value if above[2] is not None else ""
        head, _, leading = held.partition("\n")
    shown = str(value).lower() if isinstance(value, bool) else value
    commented = f"{indent}# {key}: {shown}" + (f"  {own.strip()}" if own.strip() else "") + "\n"
    text = (leading + commented if described else leading) + following
    if position == 0:
        pre = (ca.comment or [None, None])[1] or []
        if pre:  # these token objects are shared with the parent mapping's slot for this block: edit in place
            pre[0].value = text.lstrip(" ")  # printed at the token's own column; later lines carry their indent
            for tok in pre[1:]:
                tok.value = ""
        elif text.strip():
            ca.comment = [(ca.comment or [None, None])[0], [_token(text.lstrip(" "), None, len(indent))]]
    elif head or text.strip():
        column = above[2].column if above[2] is not None else 0  # the key above keeps its comment's column
        above[2] = _token(head + "\n" + text, None, column)


def _indent_of(block) -> int:
    """The column the block's keys start at (where a full-line comment belongs)."""
    lc = getattr(block, "lc", None)
    columns = [pos[1] for pos in getattr(lc, "data", {}).values() if pos]
    return min(columns) if columns else 2


def _token(text: str, like, column: int | None = None):
    from ruamel.yaml.error import CommentMark
    from ruamel.yaml.tokens import CommentToken

    return CommentToken(text, CommentMark(like.column if column is None else column))
