"""`fsdp-nb to-fsdp2` against Accelerate's own `to-fsdp2`, on configs written for the purpose.

The two must agree key for key and in key order, except where fsdp_nb fixes what
Accelerate 1.16 loses: numeric strategies become the bool FSDP2 reads (Accelerate
copies the number), the legacy `fsdp_backward_prefetch_policy` key is dropped
(Accelerate carries it into the FSDP2 config), and comments survive. Each config
also goes through both commands as a file, since a file is what users convert.

A config with no FSDP section (no fsdp_config, `fsdp_config: {}`, or an empty
`fsdp_config:`) is written back unchanged by Accelerate 1.16: its converter returns
the config as it is ("No FSDP config found ... skipping conversion") and its command
writes it out again. fsdp_nb does the same, and keeps the file's comments too.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fsdp_nb import cli
from fsdp_nb.accelerate import SHARDING_STRATEGIES, STRATEGY_TO_RESHARD
from fsdp_nb.convert import convert_to_fsdp2, dump_yaml, load_yaml

accelerate_to_fsdp2 = pytest.importorskip("accelerate.commands.to_fsdp2")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def block(**fsdp) -> dict:
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "FSDP",
        "fsdp_config": fsdp,
        "mixed_precision": "bf16",
        "num_processes": 2,
    }


CONFIGS = {
    "example_full_shard": yaml.safe_load((EXAMPLES / "accelerate_fsdp1.yaml").read_text()),
    "example_shard_grad_op": yaml.safe_load((EXAMPLES / "accelerate_fsdp1_shard_grad_op.yaml").read_text()),
    "strategy_full_shard": block(fsdp_sharding_strategy="FULL_SHARD", fsdp_use_orig_params=True, fsdp_version=1),
    "strategy_shard_grad_op": block(fsdp_sharding_strategy="SHARD_GRAD_OP", fsdp_offload_params=True),
    "strategy_no_shard": block(fsdp_sharding_strategy="NO_SHARD", fsdp_state_dict_type="FULL_STATE_DICT"),
    "strategy_hybrid": block(fsdp_sharding_strategy="HYBRID_SHARD", fsdp_sync_module_states=True),
    "strategy_hybrid_zero2": block(fsdp_reshard_after_forward="HYBRID_SHARD_ZERO2", fsdp_version=1),
    "numeric_1": block(fsdp_sharding_strategy=1, fsdp_backward_prefetch="BACKWARD_POST"),
    "numeric_2_as_text": block(
        fsdp_sharding_strategy="2", fsdp_auto_wrap_policy="SIZE_BASED_WRAP", fsdp_min_num_params=1000
    ),
    "numeric_3": block(fsdp_reshard_after_forward=3, fsdp_version=1),
    "numeric_4_hybrid": block(fsdp_sharding_strategy=4, fsdp_cpu_ram_efficient_loading=True),
    "numeric_5_hybrid_zero2": block(fsdp_sharding_strategy=5, fsdp_forward_prefetch=True),
    "legacy_prefetch_policy": block(fsdp_backward_prefetch_policy="BACKWARD_PRE", fsdp_sharding_strategy="FULL_SHARD"),
    "unknown_keys_carried": block(fsdp_ignored_modules="head", fsdp_activation_checkpointing=True, my_key=3),
    "both_strategy_keys": block(fsdp_sharding_strategy="FULL_SHARD", fsdp_reshard_after_forward="SHARD_GRAD_OP"),
    "already_fsdp2": block(fsdp_reshard_after_forward=True, fsdp_version=2),
    "no_fsdp_section": {"distributed_type": "MULTI_GPU", "num_processes": 2},
    "empty_fsdp_section": {"distributed_type": "MULTI_GPU", "fsdp_config": {}, "num_processes": 2},
    "null_fsdp_section": {"distributed_type": "MULTI_GPU", "fsdp_config": None, "num_processes": 2},
    # `accelerate config` writes keys sorted, so an empty dynamo_config comes before fsdp_config
    "empty_dynamo_config_first": {"distributed_type": "FSDP", "dynamo_config": {}, **block(fsdp_version=1)},
    "empties_inside_fsdp_config": block(fsdp_ignored_modules=[], fsdp_sharding_strategy="FULL_SHARD", extra={}),
}


def typed(config: dict) -> str:
    """JSON text keeps key order and tells 1 from True, which == does not."""
    return json.dumps(config)


def fsdp_nb_fixes(original: dict, expected: dict) -> dict:
    """Accelerate's output, with the three losses fsdp_nb fixes put right."""
    src = original.get("fsdp_config") or {}
    out = expected.get("fsdp_config")
    if not src or src.get("fsdp_version", 1) == 2:
        return expected
    for key in ("fsdp_sharding_strategy", "fsdp_reshard_after_forward"):
        value = src.get(key)
        if isinstance(value, int) and not isinstance(value, bool) or (isinstance(value, str) and value.isdigit()):
            out["fsdp_reshard_after_forward"] = STRATEGY_TO_RESHARD[SHARDING_STRATEGIES[int(value) - 1]]
    out.pop("fsdp_backward_prefetch_policy", None)
    return expected


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_same_result_as_accelerate_apart_from_the_fixes(name):
    original = CONFIGS[name]
    expected = fsdp_nb_fixes(original, accelerate_to_fsdp2.convert_config_to_fsdp2(copy.deepcopy(original)))
    ours, notes = convert_to_fsdp2(original)
    assert typed(ours) == typed(expected)  # same keys in the same order, same values of the same types
    assert notes


def accelerate_command(source: Path, target: Path) -> None:
    """Accelerate's own `accelerate to-fsdp2 --config_file source --output_file target`, in this process."""
    accelerate_to_fsdp2.to_fsdp2_command(
        argparse.Namespace(config_file=str(source), output_file=str(target), overwrite=False)
    )


def fsdp_nb_command(capsys, source: Path, target: Path) -> list[str]:
    """`fsdp-nb to-fsdp2` on the same file; it must succeed. Returns its notes."""
    code = cli.main(["to-fsdp2", "--config_file", str(source), "--output_file", str(target)])
    out, err = capsys.readouterr()
    assert (code, err) == (0, ""), err
    return out.splitlines()[1:]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_same_file_as_accelerates_own_command_apart_from_the_fixes(name, tmp_path, capsys):
    source = tmp_path / "config.yaml"
    source.write_text(yaml.safe_dump(CONFIGS[name], sort_keys=False))
    accelerate_command(source, tmp_path / "accelerate.yaml")
    fsdp_nb_command(capsys, source, tmp_path / "fsdp_nb.yaml")
    theirs = fsdp_nb_fixes(CONFIGS[name], yaml.safe_load((tmp_path / "accelerate.yaml").read_text()))
    ours = yaml.safe_load((tmp_path / "fsdp_nb.yaml").read_text())
    assert json.dumps(ours, sort_keys=True) == json.dumps(theirs, sort_keys=True)  # Accelerate's yaml.dump sorts keys
    assert typed(ours) == typed(convert_to_fsdp2(CONFIGS[name])[0])  # ours keeps the file's order


NO_FSDP_SECTION = {
    "no fsdp_config": "# a DDP run\ndistributed_type: MULTI_GPU\nmixed_precision: bf16  # A100s\nnum_processes: 2\n",
    "fsdp_config: {}": "distributed_type: MULTI_GPU\ndynamo_config: {}\nfsdp_config: {}\ngpu_ids: all\n"
    "num_processes: 2\nrdzv_backend: static\n",
    "fsdp_config: (empty)": "distributed_type: MULTI_GPU\nfsdp_config:\nmegatron_lm_config: {}\nnum_processes: 2\n",
}


@pytest.mark.parametrize("name", list(NO_FSDP_SECTION))
def test_a_config_without_fsdp_section_is_written_back_unchanged_like_accelerate_does(name, tmp_path, capsys):
    source = tmp_path / "ddp.yaml"
    source.write_text(NO_FSDP_SECTION[name])
    accelerate_command(source, tmp_path / "accelerate.yaml")
    notes = fsdp_nb_command(capsys, source, tmp_path / "fsdp_nb.yaml")
    original = yaml.safe_load(source.read_text())
    assert yaml.safe_load((tmp_path / "accelerate.yaml").read_text()) == original  # Accelerate: unchanged
    assert typed(yaml.safe_load((tmp_path / "fsdp_nb.yaml").read_text())) == typed(original)
    assert (tmp_path / "fsdp_nb.yaml").read_text() == NO_FSDP_SECTION[name]  # comments and spelling too
    assert notes == ["  - no fsdp_config section: nothing to convert"]


# Inputs on which Accelerate 1.16's own command raises (its user sees a traceback). fsdp_nb answers
# each with exit code 2 and one line naming the file, the problem and what to do; none of them has a
# correct conversion to offer, since each is missing or mistyping what the conversion needs.
ACCELERATE_RAISES = {
    # AttributeError: 'int' object has no attribute 'get'
    "fsdp_config is a number": (b"distributed_type: FSDP\nfsdp_config: 3\n", "fsdp_config is 3, not a mapping"),
    # AttributeError: 'list' object has no attribute 'get'
    "fsdp_config is a list": (b"fsdp_config: [FULL_SHARD, 2]\n", "fsdp_config is a list, not a mapping"),
    # TypeError: unhashable type: 'dict' (the strategy is looked up in a dict)
    "strategy is a mapping": (
        b"fsdp_config:\n  fsdp_sharding_strategy: {}\n",
        "fsdp_config.fsdp_sharding_strategy is a mapping, not a sharding strategy",
    ),
    # AttributeError: 'list' object has no attribute 'get'
    "a list at the top": (b"- distributed_type: FSDP\n", "expected a mapping of Accelerate options, got list"),
    # ValueError: Config file is empty
    "empty file": (b"", "the file is empty"),
    # ValueError: Config file is empty
    "only comments": (b"# nothing yet\n", "the file holds no settings"),
    # yaml ComposerError: expected a single document in the stream
    "two documents": (
        b"fsdp_config: {}\n---\nfsdp_config: {}\n",
        "not valid YAML (expected a single document in the stream, but found another document at line 2",
    ),
    # UnicodeDecodeError
    "not UTF-8": (b"fsdp_config:\n  fsdp_transformer_layer_cls_to_wrap: Bl\xf6ck\n", "not UTF-8 text (byte 0xf6"),
}


@pytest.mark.parametrize("name", list(ACCELERATE_RAISES))
def test_where_accelerate_raises_fsdp_nb_says_what_is_wrong_in_one_line(name, tmp_path, capsys):
    content, problem = ACCELERATE_RAISES[name]
    source = tmp_path / "config.yaml"
    source.write_bytes(content)
    with pytest.raises((AttributeError, TypeError, ValueError, yaml.YAMLError)):  # each row's comment says which
        accelerate_command(source, tmp_path / "accelerate.yaml")
    code = cli.main(["to-fsdp2", "--config_file", str(source), "--output_file", str(tmp_path / "fsdp_nb.yaml")])
    out, err = capsys.readouterr()
    assert (code, out, err.count("\n")) == (2, "", 1) and "Traceback" not in err
    assert err.startswith(f"fsdp-nb: error: {source}: {problem}")
    assert not (tmp_path / "fsdp_nb.yaml").exists()


def test_there_are_at_least_twelve_configs_and_they_exercise_each_fix():
    assert len(CONFIGS) >= 12
    differs = [
        n
        for n in CONFIGS
        if typed(convert_to_fsdp2(CONFIGS[n])[0])
        != typed(accelerate_to_fsdp2.convert_config_to_fsdp2(copy.deepcopy(CONFIGS[n])))
    ]
    assert {"numeric_1", "numeric_2_as_text", "numeric_4_hybrid", "legacy_prefetch_policy"} <= set(differs)


def test_numeric_strategies_and_hybrids_are_said_out_loud():
    _, notes = convert_to_fsdp2(CONFIGS["numeric_4_hybrid"])
    (note,) = [n for n in notes if n.startswith("fsdp_sharding_strategy")]
    assert note.startswith("fsdp_sharding_strategy: 4 (HYBRID_SHARD) -> fsdp_reshard_after_forward: true")
    assert "2-D device mesh" in note
    _, notes = convert_to_fsdp2(CONFIGS["numeric_5_hybrid_zero2"])
    assert any("5 (HYBRID_SHARD_ZERO2) -> fsdp_reshard_after_forward: false" in n for n in notes)


COMMENTED = """\
# Our FSDP1 setup, tuned in March
compute_environment: LOCAL_MACHINE
distributed_type: FSDP  # not DDP
downcast_bf16: 'no'
fsdp_config:
  # one unit per decoder block
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_backward_prefetch_policy: BACKWARD_PRE  # from an old template
  fsdp_sharding_strategy: 2  # ZeRO-2 style
  # rank 0 loads, the others receive
  fsdp_cpu_ram_efficient_loading: true
  fsdp_sync_module_states: true
  fsdp_version: 1
# processes per node
num_processes: 2
"""


def test_comments_and_key_order_survive_a_round_trip():
    new, _ = convert_to_fsdp2(load_yaml(COMMENTED))
    text = dump_yaml(new)
    comments = [ln.split("#", 1)[1].strip() for ln in COMMENTED.splitlines() if "#" in ln]
    kept = [ln.split("#")[-1].strip() for ln in text.splitlines() if "#" in ln]
    assert [c for c in comments if c not in kept] == []
    data = yaml.safe_load(text)  # what Accelerate reads: YAML 1.1, so 'no' must stay quoted
    assert data["downcast_bf16"] == "no"
    assert list(data["fsdp_config"]) == [
        "fsdp_auto_wrap_policy",
        "fsdp_reshard_after_forward",
        "fsdp_cpu_ram_efficient_loading",
        "fsdp_version",
    ]
    assert data["fsdp_config"]["fsdp_reshard_after_forward"] is False
    # a dropped key with a comment stays visible as a commented-out line, so its comment keeps its subject
    assert "# fsdp_backward_prefetch_policy: BACKWARD_PRE  # from an old template" in text
    assert "fsdp_reshard_after_forward: false  # ZeRO-2 style" in text


def test_cli_output_reads_back_in_accelerate(tmp_path):
    source = tmp_path / "fsdp1.yaml"
    source.write_text(COMMENTED)
    target = tmp_path / "fsdp2.yaml"
    cli = [sys.executable, "-m", "fsdp_nb.cli", "to-fsdp2", "--config_file", str(source), "--output_file", str(target)]
    subprocess.run(cli, check=True, capture_output=True, timeout=60)
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(target))  # Accelerate's own reader accepts the converted file
    assert config.fsdp_config["fsdp_version"] == 2 and config.fsdp_config["fsdp_reshard_after_forward"] is False


def test_a_comment_above_a_dropped_key_stays_with_it_at_the_files_indentation():
    text = (
        "fsdp_config:\n"
        "    # the old prefetch key\n"
        "    fsdp_backward_prefetch_policy: BACKWARD_PRE\n"
        "    fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP  # per block\n"
        "    # FSDP1 needs this with cpu_ram_efficient_loading\n"
        "    fsdp_sync_module_states: true\n"
        "    fsdp_offload_params: false\n"
        "    fsdp_use_orig_params: true\n"
        "    fsdp_sharding_strategy: 1  # full\n"
        "    fsdp_version: 1\n"
    )
    out = dump_yaml(convert_to_fsdp2(load_yaml(text))[0])
    assert out == (
        "fsdp_config:\n"
        "    # the old prefetch key\n"
        "    # fsdp_backward_prefetch_policy: BACKWARD_PRE\n"
        "    fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP  # per block\n"
        "    # FSDP1 needs this with cpu_ram_efficient_loading\n"
        "    # fsdp_sync_module_states: true\n"
        "    fsdp_offload_params: false\n"
        "    fsdp_reshard_after_forward: true  # full\n"
        "    fsdp_version: 2\n"
    )  # an uncommented dropped key (use_orig_params) leaves no line
