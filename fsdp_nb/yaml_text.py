"""YAML text in and out, as Accelerate reads it: comments kept, values unchanged.

`load_yaml` reads a config file with ruamel.yaml's round-trip loader, which keeps
every comment and the key order; `dump_yaml` writes it back at the file's own
indentation. Accelerate itself reads with PyYAML (YAML 1.1), so both take care of
the words YAML 1.1 and 1.2 read differently (a bare `no` is False to one, a string
to the other). `read_document`, `yaml_problem` and `check_accelerate_reads` turn
whatever a file can get wrong into one ValueError line; `rename_key` and `drop_key`
edit a mapping in place without losing the comments around the key.
Pure: text in, a document or text out.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any


def load_yaml(text: str):
    """Parse YAML text for conversion, keeping comments and key order (ruamel.yaml round trip)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.scalarstring import PlainScalarString

    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True  # 'no' stays quoted: Accelerate reads YAML 1.1, where a bare no is False
    document = yaml.load(text)
    # ... and a bare no stays bare: ruamel (YAML 1.2) reads it as the string "no", which dump_yaml
    # would quote, turning Accelerate's False into a string. Mark it as written, so it is written back so.
    for node in containers(document):
        for key, value in list(own_items(node)):
            if type(value) is str and value in _YAML11_BOOLS:
                node[key] = PlainScalarString(value)
    return document


def read_document(text: str):
    """The round-trip document of a config file's text, or ValueError saying why it is not an Accelerate config."""
    from ruamel.yaml import YAMLError

    try:
        document = load_yaml(text)
    except YAMLError as err:
        raise ValueError(f"not valid YAML ({yaml_problem(err, text)}); fix the file there and run again") from None
    what_to_do = "give an Accelerate config, such as the file `accelerate config` writes"
    if not text.strip():
        raise ValueError(f"the file is empty; {what_to_do}")
    if document is None or (isinstance(document, Mapping) and not document):
        raise ValueError(f"the file holds no settings (only comments, `---`, null or {{}}); {what_to_do}")
    if not isinstance(document, Mapping):
        kind = "list" if isinstance(document, list) else type(document).__name__
        raise ValueError(
            f"expected a mapping of Accelerate options, got {kind}; the file should be `key: value` lines "
            "such as `distributed_type: FSDP`"
        )
    return document


def yaml_problem(err, text: str) -> str:
    """One line from a ruamel.yaml or PyYAML error: what the reader was doing, what it found, and where."""
    parts = [part for part in (getattr(err, "context", None), getattr(err, "problem", None)) if part]
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    if isinstance(getattr(err, "character", None), int):  # a ReaderError: a character no YAML file may hold
        line = text.count("\n", 0, err.position) + 1
        parts, where = [f"character #x{err.character:04x} at line {line}, which YAML does not allow"], ""
    return " ".join((", ".join(parts) + where if parts else str(err)).split())


def check_accelerate_reads(new_text: str, expected) -> None:
    """ValueError unless PyYAML reads `new_text` as `expected`, key for key, types and order included."""
    import yaml

    def shown(value) -> str:  # YAML text: NaN equals NaN, and 1 differs from True
        return yaml.safe_dump(value, sort_keys=False)

    try:
        got = yaml.safe_load(new_text)
    except yaml.YAMLError as err:  # not seen: a guard, so that an fsdp_nb bug is one line too
        raise ValueError(f"the converted text would not load in Accelerate ({yaml_problem(err, new_text)})") from None
    if shown(got) == shown(expected):
        return
    keys = list(dict.fromkeys([*expected, *got]))
    key = next((k for k in keys if k not in got or k not in expected or shown(got[k]) != shown(expected[k])), None)
    what = "the key order" if key is None else f"key {key!r}"
    raise ValueError(
        f"written back, {what} would read differently in Accelerate (a value the comment-keeping round trip "
        "cannot copy, such as an overflowing number or a recursive alias); simplify that value and run again"
    )


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
# The booleans of YAML 1.1 (PyYAML's spellings) that YAML 1.2, which ruamel.yaml reads, calls strings.
_YAML11_BOOLS = {spelled for word in ("yes", "no", "on", "off") for spelled in (word, word.title(), word.upper())}


def _represent_str(representer, value: str):
    plain = value.lower() not in _YAML11_WORDS and not value.replace(".", "", 1).lstrip("-+").isdigit()
    return representer.represent_scalar("tag:yaml.org,2002:str", value, style=None if plain else "'")


def _mapping_indent(document) -> int:
    """How far the file indented its nested mappings (2 unless it says otherwise).

    Only a non-empty block mapping shows it: `{}`, `[]` and flow collections have
    no indentation of their own (and ruamel.yaml keeps no positions for empty ones).
    """
    outer = key_columns(document)
    for value in document.values() if isinstance(document, Mapping) else ():
        flow = getattr(getattr(value, "fa", None), "flow_style", lambda: False)()
        columns = key_columns(value) if isinstance(value, Mapping) and not flow else []
        if columns:
            return max(1, min(columns) - min(outer, default=0))
    return 2


def key_columns(node) -> list[int]:
    """The columns the file wrote `node`'s keys or items at; none for an empty or constructed node."""
    data = getattr(getattr(node, "lc", None), "data", None) or {}
    return [pos[1] for pos in data.values() if pos]


# ---- walking a document that aliases may share ------------------------------------------


def containers(root):
    """Every mapping and list under `root`, itself included, once each, however many aliases reach it."""
    seen: set[int] = set()
    stack = [root] if isinstance(root, (Mapping, list)) else []
    while stack:  # a loop, not recursion: a deep file must not exhaust the stack here
        node = stack.pop()
        if id(node) not in seen:
            seen.add(id(node))
            yield node
            stack.extend(value for _, value in own_items(node) if isinstance(value, (Mapping, list)))


def own_items(node):
    """(key or index, value) pairs of a mapping or list; a merge key's keys belong to the mapping they came from."""
    if hasattr(node, "non_merged_items"):
        return node.non_merged_items()
    return node.items() if isinstance(node, Mapping) else enumerate(node)


# ---- editing a mapping in place, comments included ----------------------------------
# ruamel.yaml keeps the comment lines that stand before a key on the key above it,
# as the tail of that key's end-of-line comment token (`block.ca.items[key][2]`), or
# on the block itself for the first key. Dropping a key must hand those lines on.


def rename_key(block, key: str, new_key: str, value: Any) -> None:
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
                column = indent_of(block) + len(f"{new_key}: {shown}") + 2  # after the new value
                comment = [*comment[:2], comment_token(comment[2].value, comment[2], column), *comment[3:]]
            block.ca.items[new_key] = comment
        return
    items = list(block.items())  # a plain dict: rebuild in order
    items[position] = (new_key, value)
    block.clear()
    block.update(items)


def described_keys(block) -> set[str]:
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


def drop_key(block, key: str, described: bool = False) -> None:
    """Delete `key`, keeping every comment with its subject: a key that had comments (`described`:
    above it or at its end) stays as a commented-out line `# key: value  # comment`, under them."""
    ca = getattr(block, "ca", None)
    keys = list(block)
    position = keys.index(key)
    value = block.pop(key)
    if ca is None:
        return
    indent = " " * indent_of(block)
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
            ca.comment = [(ca.comment or [None, None])[0], [comment_token(text.lstrip(" "), None, len(indent))]]
    elif head or text.strip():
        column = above[2].column if above[2] is not None else 0  # the key above keeps its comment's column
        above[2] = comment_token(head + "\n" + text, None, column)


def indent_of(block) -> int:
    """The column the block's keys start at (where a full-line comment belongs)."""
    columns = key_columns(block)
    return min(columns) if columns else 2


def comment_token(text: str, like, column: int | None = None):
    from ruamel.yaml.error import CommentMark
    from ruamel.yaml.tokens import CommentToken

    return CommentToken(text, CommentMark(like.column if column is None else column))
