"""`fsdp-nb to-fsdp2` on malformed and odd files: one error line or a correct conversion, never a traceback.

Every file goes through the real entry point, `fsdp_nb.cli.main`, as a file on disk
(and a few through a subprocess, as a user runs it). Each ends one of two ways:
- exit code 2, nothing on stdout, exactly one line on stderr that names the file,
  says what is wrong and what to do, and no output file (not even a temporary one);
- exit code 0 and a file that Accelerate's own reader (PyYAML) reads as the expected
  FSDP2 config, value for value, type for type and in order.

Where Accelerate 1.16 does something else with the same file, the row says what.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fsdp_nb import cli
from fsdp_nb.accelerate import REMOVED_IN_FSDP2

FSDP1 = "distributed_type: FSDP\nfsdp_config:\n  fsdp_sharding_strategy: FULL_SHARD\n  fsdp_version: 1\n"
CONVERTED = {"fsdp_reshard_after_forward": True, "fsdp_version": 2}  # what FSDP1 above becomes
FSDP1_ONLY = set(REMOVED_IN_FSDP2) | {"fsdp_sharding_strategy", "fsdp_backward_prefetch_policy"}


def run(capsys, source: Path, target: Path, *extra: str) -> tuple[int, str, str]:
    code = cli.main(["to-fsdp2", "--config_file", str(source), "--output_file", str(target), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code: int, out: str, err: str) -> str:
    assert (code, out) == (2, ""), (code, out, err)
    assert err.endswith("\n") and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("fsdp-nb: error: ")
    return err.strip()


def shown(value) -> str:
    """YAML text of a value: compares order and types (1 is not True), and NaN equals NaN."""
    return yaml.safe_dump(value, sort_keys=False)


# ---- files that are refused ----------------------------------------------------------------------

BOMB = "l0: &l0 [lol, lol]\n" + "".join(f"l{i}: &l{i} [*l{i - 1}, *l{i - 1}, *l{i - 1}]\n" for i in range(1, 12))

# name: (file content, the problem the line names, what it tells the user to do)
ERRORS = {
    # Accelerate: ValueError "Config file is empty" (a traceback), for the next five too
    "empty file": (b"", "the file is empty", "give an Accelerate config"),
    "only blank lines": (b"\n   \n\n", "the file is empty", "give an Accelerate config"),
    "only comments": (b"# todo: run accelerate config\n# later\n", "the file holds no settings", "give an Accelerate"),
    "only a document marker": (b"---\n", "the file holds no settings", "give an Accelerate config"),
    "only null": (b"null\n", "the file holds no settings", "give an Accelerate config"),
    "an empty mapping": (b"{}\n", "the file holds no settings", "give an Accelerate config"),
    # Accelerate: AttributeError "'list' object has no attribute 'get'"
    "a list at the top": (b"- distributed_type: FSDP\n- num_processes: 2\n", "got list", "`key: value` lines"),
    "a string at the top": (b"FULL_SHARD\n", "got str", "`key: value` lines"),
    "a number at the top": (b"2\n", "got int", "`key: value` lines"),
    # Accelerate: AttributeError "'int' object has no attribute 'get'"
    "fsdp_config: 3": (b"distributed_type: FSDP\nfsdp_config: 3\n", "fsdp_config is 3, not a mapping", "write it as"),
    "fsdp_config: [a, b]": (b"fsdp_config: [a, b]\n", "fsdp_config is a list, not a mapping", "write it as"),
    "fsdp_config: FULL_SHARD": (b"fsdp_config: FULL_SHARD\n", "fsdp_config is 'FULL_SHARD'", "or remove it"),
    # Accelerate takes an empty list or false for "no FSDP section" and writes it back; it is the wrong type
    "fsdp_config: []": (b"distributed_type: FSDP\nfsdp_config: []\n", "fsdp_config is a list, not", "or remove it"),
    "fsdp_config: false": (b"fsdp_config: false\n", "fsdp_config is False, not a mapping", "or remove it"),
    "fsdp_config: !!set": (b"fsdp_config: !!set {a, b}\n", "fsdp_config is a set, not a mapping", "or remove it"),
    # Accelerate: TypeError "unhashable type: 'dict'"
    "fsdp_sharding_strategy: {}": (
        b"fsdp_config:\n  fsdp_sharding_strategy: {}\n",
        "fsdp_config.fsdp_sharding_strategy is a mapping, not a sharding strategy; accepted: FULL_SHARD,",
        "fix it and run again",
    ),
    "fsdp_reshard_after_forward: [FULL_SHARD]": (
        b"fsdp_config:\n  fsdp_reshard_after_forward: [FULL_SHARD]\n  fsdp_version: 1\n",
        "fsdp_config.fsdp_reshard_after_forward is a list, not a sharding strategy",
        "fix it and run again",
    ),
    # Accelerate converts these and overwrites the version with 2
    "fsdp_version: two": (
        b"fsdp_config:\n  fsdp_sharding_strategy: FULL_SHARD\n  fsdp_version: two\n",
        "fsdp_config.fsdp_version is 'two'; accepted: 1 (an FSDP1 config, which is converted) or 2",
        "set it to 1 and run again",
    ),
    "fsdp_version: 3": (b"fsdp_config:\n  fsdp_version: 3\n", "fsdp_config.fsdp_version is 3;", "set it to 1"),
    "fsdp_version: 1.5": (b"fsdp_config:\n  fsdp_version: 1.5\n", "fsdp_config.fsdp_version is 1.5;", "set it to 1"),
    "fsdp_version: true": (b"fsdp_config:\n  fsdp_version: true\n", "fsdp_config.fsdp_version is True;", "set it"),
    "fsdp_version: {}": (b"fsdp_config:\n  fsdp_version: {}\n", "fsdp_config.fsdp_version is a mapping;", "set it"),
    # Accelerate (PyYAML) silently keeps the last of two equal keys
    "duplicate top-level key": (
        b"num_processes: 2\ndistributed_type: FSDP\nnum_processes: 8\n",
        'not valid YAML (while constructing a mapping, found duplicate key "num_processes" with value "8" '
        '(original value: "2") at line 3, column 1)',
        "fix the file there and run again",
    ),
    "duplicate fsdp_config key": (
        FSDP1.encode() + b"  fsdp_sharding_strategy: SHARD_GRAD_OP\n",
        'found duplicate key "fsdp_sharding_strategy" with value "SHARD_GRAD_OP" (original value: "FULL_SHARD") '
        "at line 5, column 3",
        "fix the file there",
    ),
    # Accelerate: yaml ScannerError, for both
    "tab indentation": (
        b"fsdp_config:\n\tfsdp_version: 1\n",
        "not valid YAML (while scanning for the next token, found character '\\t' that cannot start any token "
        "at line 2, column 1)",
        "fix the file there",
    ),
    "tab after a colon": (b"fsdp_config:\n  fsdp_version:\t1\n", "'\\t' that cannot start any token at line 2", "fix"),
    "unclosed flow list": (b"fsdp_config: [FULL_SHARD\n", "not valid YAML (while parsing a flow sequence", "fix"),
    # Accelerate: UnicodeDecodeError, for the next three
    "random bytes": (random.Random(0).randbytes(512), "not UTF-8 text (byte 0xcd on line 1)", "saved as UTF-8"),
    "latin-1 text": (
        b"fsdp_config:\n  fsdp_transformer_layer_cls_to_wrap: Bl\xf6ck\n",
        "byte 0xf6 on line 2",
        "UTF-8",
    ),
    "UTF-16 text": (FSDP1.encode("utf-16"), "not UTF-8 text (byte 0xff on line 1)", "saved as UTF-8"),
    # Accelerate: yaml ReaderError
    "a NUL byte": (
        FSDP1.encode() + b"num_processes: 2\x00\n",
        "character #x0000 at line 5, which YAML does not",
        "fix",
    ),
    # Accelerate: yaml ComposerError
    "two documents": (
        FSDP1.encode() + b"---\n" + FSDP1.encode(),
        "not valid YAML (expected a single document in the stream, but found another document at line 5, column 1)",
        "fix the file there",
    ),
    # Accelerate: yaml ConstructorError, for the next three; ruamel.yaml alone would read them
    "a custom tag": (
        b"fsdp_config: !Foo\n  fsdp_version: 1\n",
        "Accelerate's YAML reader (PyYAML) cannot read it (could not determine a constructor for the tag '!Foo' "
        "at line 1, column 14)",
        "write that part in plain YAML",
    ),
    "a python object tag": (
        b"x: !!python/object/apply:os.system ['touch PWNED']\n" + FSDP1.encode(),
        "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'",
        "write that part in plain YAML",
    ),
    "a list as a key": (b"? [a, b]\n: 1\n" + FSDP1.encode(), "found unhashable key at line 1", "plain YAML"),
    # Accelerate resolves the merge; ruamel.yaml would copy the merged keys out twice
    "a merge key": (
        b"defaults: &d\n  fsdp_sharding_strategy: FULL_SHARD\nfsdp_config:\n  <<: *d\n  fsdp_version: 1\n",
        "line 4 takes keys from a YAML merge key (<<: *anchor)",
        "write those keys out in place and run again",
    ),
    # Accelerate reads the list as containing itself; ruamel.yaml reads [1, null]
    "a recursive alias": (b"loop: &l [1, *l]\n" + FSDP1.encode(), "key 'loop' would read differently", "simplify"),
    # PyYAML reads 1e999 (no dot) as a string, ruamel.yaml as infinity
    "an overflowing float": (FSDP1.encode() + b"lr: 1e999\n", "key 'lr' would read differently", "simplify that"),
    # PyYAML reads a bare yes as True, also as a key; ruamel.yaml's string key would be written back quoted
    "yes as a key": (b"yes: 1\n" + FSDP1.encode(), "key True would read differently in Accelerate", "simplify"),
    # Accelerate: RecursionError
    "nested 500 deep": (b"a: " + b"[" * 500 + b"]" * 500 + b"\n" + FSDP1.encode(), "nested too deeply", "flatten"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_a_file_that_cannot_be_converted_is_one_line_and_no_output(name, tmp_path, capsys, monkeypatch):
    content, problem, what_to_do = ERRORS[name]
    source, target = tmp_path / "config.yaml", tmp_path / "fsdp2.yaml"
    source.write_bytes(content)
    monkeypatch.chdir(tmp_path)  # where `touch PWNED` would land
    line = one_error_line(*run(capsys, source, target))
    assert line.startswith(f"fsdp-nb: error: {source}: ")
    assert problem in line and what_to_do in line.split(problem)[-1]  # the problem, then what to do
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # no output, no temporary file
    assert source.read_bytes() == content


def test_overwriting_the_input_with_a_bad_file_leaves_it_as_it_was(tmp_path, capsys):
    source = tmp_path / "config.yaml"
    source.write_text("# keep me\nfsdp_config:\n  fsdp_version: two\n")
    code = cli.main(["to-fsdp2", "--config_file", str(source), "--overwrite"])
    line = one_error_line(code, *capsys.readouterr())
    assert line.startswith(f"fsdp-nb: error: {source}: fsdp_config.fsdp_version is 'two'")
    assert source.read_text() == "# keep me\nfsdp_config:\n  fsdp_version: two\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


# ---- files that are converted --------------------------------------------------------------------

# name: (file content, what Accelerate's reader must get from the converted file)
CONVERSIONS = {
    # the bug report: AttributeError on ruamel's missing line data for an empty mapping
    "dynamo_config: {} before fsdp_config": (
        b"distributed_type: FSDP\ndynamo_config: {}\nfsdp_config:\n  fsdp_sharding_strategy: SHARD_GRAD_OP\n"
        b"  fsdp_version: 1\nnum_processes: 2\n",
        {
            "distributed_type": "FSDP",
            "dynamo_config": {},
            "fsdp_config": {"fsdp_reshard_after_forward": False, "fsdp_version": 2},
            "num_processes": 2,
        },
    ),
    # as Accelerate: nothing to convert, written back unchanged
    "DDP without fsdp_config": (
        b"distributed_type: MULTI_GPU\ngpu_ids: []\n",
        {"distributed_type": "MULTI_GPU", "gpu_ids": []},
    ),
    "DDP with fsdp_config: {}": (b"fsdp_config: {}\nnum_processes: 2\n", {"fsdp_config": {}, "num_processes": 2}),
    "DDP with an empty fsdp_config:": (b"fsdp_config:\nnum_processes: 2\n", {"fsdp_config": None, "num_processes": 2}),
    "empties at every depth": (
        b"a: {}\nb: []\nc:\n  d: {}\n  e: [[], {}, [[]]]\nfsdp_config:\n  fsdp_ignored_modules: []\n"
        b"  fsdp_sharding_strategy: NO_SHARD\n  x: {y: {}}\n  fsdp_version: 1\n",
        {
            "a": {},
            "b": [],
            "c": {"d": {}, "e": [[], {}, [[]]]},
            "fsdp_config": {
                "fsdp_ignored_modules": [],
                "fsdp_reshard_after_forward": False,
                "x": {"y": {}},
                "fsdp_version": 2,
            },
        },
    ),
    "unknown keys, top level and in fsdp_config": (
        b"my_team: infra\nfsdp_config:\n  fsdp_sharding_strategy: 1\n  fsdp_my_option: [1, 2]\n  7: seven\n",
        {
            "my_team": "infra",
            "fsdp_config": {
                "fsdp_reshard_after_forward": True,
                "fsdp_my_option": [1, 2],
                7: "seven",
                "fsdp_version": 2,
            },
        },
    ),
    # as Accelerate: already FSDP2, written back unchanged
    "fsdp_version: 2 already": (
        b"fsdp_config:\n  fsdp_reshard_after_forward: false\n  fsdp_version: 2\n",
        {"fsdp_config": {"fsdp_reshard_after_forward": False, "fsdp_version": 2}},
    ),
    # Accelerate would convert it again, since '2' != 2; `accelerate launch` reads it as FSDP2
    "fsdp_version: '2' as a string": (
        b"fsdp_config:\n  fsdp_sharding_strategy: FULL_SHARD\n  fsdp_version: '2'\n",
        {"fsdp_config": {"fsdp_sharding_strategy": "FULL_SHARD", "fsdp_version": "2"}},
    ),
    "fsdp_version: (empty) means 1": (
        b"fsdp_config:\n  fsdp_version:\n  fsdp_sharding_strategy: HYBRID_SHARD\n",
        {"fsdp_config": {"fsdp_version": 2, "fsdp_reshard_after_forward": True}},
    ),
    "fsdp_config with only fsdp_version: 1": (
        b"fsdp_config:\n  fsdp_version: 1\n",
        {"fsdp_config": {"fsdp_version": 2}},
    ),
    # as Accelerate: an unknown strategy value is copied (with a note)
    "a huge strategy number": (
        b"fsdp_config:\n  fsdp_sharding_strategy: 99999999999999999999\n",
        {"fsdp_config": {"fsdp_reshard_after_forward": 99999999999999999999, "fsdp_version": 2}},
    ),
    "an empty strategy": (
        b"fsdp_config:\n  fsdp_sharding_strategy:\n",
        {"fsdp_config": {"fsdp_reshard_after_forward": None, "fsdp_version": 2}},
    ),
    "a huge number": (FSDP1.encode() + b"num_processes: 123456789012345678901234567890\n", None),
    "NaN and infinity": (FSDP1.encode() + b"lr: .nan\nclip: -.inf\n", None),
    # as Accelerate: the anchor's owner keeps its FSDP1 keys; only fsdp_config is converted
    "fsdp_config is an alias": (
        b"defaults: &d\n  fsdp_sharding_strategy: SHARD_GRAD_OP\n  fsdp_sync_module_states: true\nfsdp_config: *d\n",
        {
            "defaults": {"fsdp_sharding_strategy": "SHARD_GRAD_OP", "fsdp_sync_module_states": True},
            "fsdp_config": {"fsdp_reshard_after_forward": False, "fsdp_version": 2},
        },
    ),
    "a strategy from an alias": (
        b"s: &s SHARD_GRAD_OP\nfsdp_config:\n  fsdp_sharding_strategy: *s\n",
        {"s": "SHARD_GRAD_OP", "fsdp_config": {"fsdp_reshard_after_forward": False, "fsdp_version": 2}},
    ),
    "a billion laughs": ((BOMB + FSDP1).encode(), None),
    # bare YAML 1.1 booleans stay bare: Accelerate reads them as bools before and after
    "bare yes and no": (
        b"downcast_bf16: no\nfsdp_config:\n  fsdp_offload_params: yes\n  fsdp_sharding_strategy: FULL_SHARD\n  x: On\n",
        {
            "downcast_bf16": False,
            "fsdp_config": {
                "fsdp_offload_params": True,
                "fsdp_reshard_after_forward": True,
                "x": True,
                "fsdp_version": 2,
            },
        },
    ),
    "numbers YAML 1.1 reads its own way": (FSDP1.encode() + b"a: 017\nb: 0x1F\nc: 1:30\nd: 1e5\ne: 2024-01-02\n", None),
    "a UTF-8 byte order mark": (
        b"\xef\xbb\xbf" + FSDP1.encode(),
        {"distributed_type": "FSDP", "fsdp_config": CONVERTED},
    ),
    "Windows line ends": (FSDP1.replace("\n", "\r\n").encode(), {"distributed_type": "FSDP", "fsdp_config": CONVERTED}),
    "document markers": (b"---\n" + FSDP1.encode() + b"...\n", {"distributed_type": "FSDP", "fsdp_config": CONVERTED}),
    "flow style": (
        b"{distributed_type: FSDP, fsdp_config: {fsdp_sharding_strategy: 2, fsdp_use_orig_params: true}}\n",
        {"distributed_type": "FSDP", "fsdp_config": {"fsdp_reshard_after_forward": False, "fsdp_version": 2}},
    ),
    "non-ASCII text": (
        "owner: Zoë 🚀  # über\n".encode() + FSDP1.encode(),
        {"owner": "Zoë 🚀", "distributed_type": "FSDP", "fsdp_config": CONVERTED},
    ),
    "a list first, four-space indentation": (
        b"gpu_ids:\n- 0\n- 1\nfsdp_config:\n    fsdp_sharding_strategy: 2\n    fsdp_version: 1\n",
        {"gpu_ids": [0, 1], "fsdp_config": {"fsdp_reshard_after_forward": False, "fsdp_version": 2}},
    ),
    "a 100 000 character value": (FSDP1.encode() + b"note: " + b"x" * 100_000 + b"\n", None),
    "nested 100 deep": (b"a: " + b"[" * 100 + b"]" * 100 + b"\n" + FSDP1.encode(), None),
}


def converted_by_accelerate_rules(content: bytes) -> dict:
    """The expected reading for rows that give None: the input as PyYAML reads it, with fsdp_config converted."""
    expected = yaml.safe_load(content.decode("utf-8-sig"))
    expected["fsdp_config"] = CONVERTED
    return expected


@pytest.mark.parametrize("name", list(CONVERSIONS))
def test_an_odd_file_that_can_be_converted_is_converted_correctly(name, tmp_path, capsys):
    content, expected = CONVERSIONS[name]
    expected = converted_by_accelerate_rules(content) if expected is None else expected
    source, target = tmp_path / "config.yaml", tmp_path / "fsdp2.yaml"
    source.write_bytes(content)
    code, out, err = run(capsys, source, target)
    assert (code, err) == (0, "")
    assert out.startswith(f"{source} -> {target}\n  - ")  # then the notes, one per line
    got = yaml.safe_load(target.read_text(encoding="utf-8"))
    assert shown(got) == shown(expected)
    block = got.get("fsdp_config")
    if block and name != "fsdp_version: '2' as a string":  # that one is FSDP2 already, as `accelerate launch` reads it
        assert block["fsdp_version"] == 2 and not set(block) & FSDP1_ONLY
    assert source.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "fsdp2.yaml"]


def test_no_fsdp_section_is_written_back_byte_for_byte(tmp_path, capsys):
    source = tmp_path / "ddp.yaml"
    text = "# DDP, 2 GPUs\ncompute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\ndowncast_bf16: 'no'\n" + (
        "dynamo_config: {}\nfsdp_config: {}\ngpu_ids: all\nmegatron_lm_config: {}\nnum_processes: 2  # per node\n"
    )
    source.write_text(text)
    code, out, _ = run(capsys, source, tmp_path / "out.yaml")
    assert code == 0 and out.endswith("  - no fsdp_config section: nothing to convert\n")
    assert (tmp_path / "out.yaml").read_text() == text


def test_comments_survive_next_to_empty_collections(tmp_path, capsys):
    source = tmp_path / "c.yaml"
    source.write_text(
        "# tuned in March\ndynamo_config: {}  # no compile\nfsdp_config:\n"
        "  fsdp_sharding_strategy: SHARD_GRAD_OP  # ZeRO-2\n  fsdp_ignored_modules: []  # none\n  fsdp_version: 1\n"
    )
    assert run(capsys, source, tmp_path / "out.yaml")[0] == 0
    assert (tmp_path / "out.yaml").read_text() == (
        "# tuned in March\ndynamo_config: {}  # no compile\nfsdp_config:\n"
        "  fsdp_reshard_after_forward: false  # ZeRO-2\n  fsdp_ignored_modules: []  # none\n  fsdp_version: 2\n"
    )


def test_there_are_at_least_thirty_odd_inputs():
    assert len(ERRORS) + len(CONVERSIONS) >= 30 and len(ERRORS) >= 15 and len(CONVERSIONS) >= 15


# ---- paths that are not a readable file, or not a writable place ----------------------------------


def test_a_directory_as_config_file(tmp_path, capsys):
    line = one_error_line(*run(capsys, tmp_path, tmp_path / "out.yaml"))
    assert line == f"fsdp-nb: error: config file {tmp_path} is a directory; pass the path of an Accelerate config file"
    assert not (tmp_path / "out.yaml").exists()


def test_a_device_as_config_file(tmp_path, capsys):
    line = one_error_line(*run(capsys, Path(os.devnull), tmp_path / "out.yaml"))
    assert (
        line
        == f"fsdp-nb: error: config file {os.devnull} is not a regular file; pass the path of an Accelerate config file"
    )
    assert not (tmp_path / "out.yaml").exists()


def test_a_missing_config_file(tmp_path, capsys):
    missing = tmp_path / "nope" / "config.yaml"
    assert (
        one_error_line(*run(capsys, missing, tmp_path / "out.yaml"))
        == f"fsdp-nb: error: config file {missing} not found"
    )
    assert list(tmp_path.iterdir()) == []


def test_an_output_file_in_a_missing_directory(tmp_path, capsys):
    source = tmp_path / "c.yaml"
    source.write_text(FSDP1)
    target = tmp_path / "no" / "such" / "dir" / "out.yaml"
    line = one_error_line(*run(capsys, source, target))
    assert line == f"fsdp-nb: error: output file {target}: directory {target.parent} does not exist; create it first"
    assert [p.name for p in tmp_path.iterdir()] == ["c.yaml"]


def test_an_output_file_under_a_file(tmp_path, capsys):
    source = tmp_path / "c.yaml"
    source.write_text(FSDP1)
    line = one_error_line(*run(capsys, source, source / "out.yaml"))
    assert (
        line
        == f"fsdp-nb: error: output file {source / 'out.yaml'}: {source} is not a directory; pick another --output_file"
    )
    assert source.read_text() == FSDP1


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_directory_as_output_file(tmp_path, capsys, overwrite):
    source = tmp_path / "c.yaml"
    source.write_text(FSDP1)
    (tmp_path / "out").mkdir()
    line = one_error_line(*run(capsys, source, tmp_path / "out", *overwrite))
    assert line == f"fsdp-nb: error: output file {tmp_path / 'out'} is a directory; pass a file path to --output_file"
    assert list((tmp_path / "out").iterdir()) == []


def test_a_failed_write_leaves_neither_a_half_written_file_nor_a_temporary_one(tmp_path, capsys, monkeypatch):
    source, target = tmp_path / "c.yaml", tmp_path / "out.yaml"
    source.write_text(FSDP1)
    target.write_text("old: config\n")
    real_write = Path.write_text

    def disk_full(self, text, *args, **kwargs):  # writes part of the file, then fails as a full disk does
        real_write(self, text[:10], *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", disk_full)
    line = one_error_line(*run(capsys, source, target, "--overwrite"))
    full = os.strerror(errno.ENOSPC)
    assert line == f"fsdp-nb: error: output file {target}: cannot write it ({full}); pick another --output_file"
    assert target.read_text() == "old: config\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "out.yaml"]


# ---- as a user runs it ----------------------------------------------------------------------------


def command_line() -> list[str]:
    script = Path(sys.executable).with_name("fsdp-nb")
    return [str(script)] if script.exists() else [sys.executable, "-m", "fsdp_nb.cli"]


@pytest.mark.parametrize(
    "name, argv",
    [("nested 500 deep", command_line()), ("random bytes", [sys.executable, "-m", "fsdp_nb.cli"])],
)
def test_errors_from_a_real_process_are_one_line(tmp_path, name, argv):
    content, problem, what_to_do = ERRORS[name]
    source, target = tmp_path / "config.yaml", tmp_path / "out.yaml"
    source.write_bytes(content)
    cmd = [*argv, "to-fsdp2", "--config_file", str(source), "--output_file", str(target)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"fsdp-nb: error: {source}: {problem}")
    assert what_to_do in done.stderr and not target.exists()


def test_a_conversion_from_a_real_process(tmp_path):
    content, expected = CONVERSIONS["dynamo_config: {} before fsdp_config"]
    source, target = tmp_path / "config.yaml", tmp_path / "out.yaml"
    source.write_bytes(content)
    cmd = [*command_line(), "to-fsdp2", "--config_file", str(source), "--output_file", str(target)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert (done.returncode, done.stderr) == (0, "")
    assert shown(yaml.safe_load(target.read_text())) == shown(expected)
