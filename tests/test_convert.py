"""Accelerate's YAML files and launcher variables -> FSDPConfig, and `to-fsdp2` rules. Pure and fast.

The expected values are written by hand from Accelerate's source: `commands/to_fsdp2.py`
(the conversion table), `utils/launch.py` (the FSDP_* variables) and
`commands/config/cluster.py` (the keys `accelerate config` writes).
"""

import copy
import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from fsdp_nb.accelerate import YAML_KEY_TO_FIELD, accelerate_dict
from fsdp_nb.config import FSDPConfig, MixedPrecision
from fsdp_nb.convert import config_from_accelerate, convert_to_fsdp2, dump_yaml, load_yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FSDP1, FSDP2, SHARD_GRAD_OP = (
    EXAMPLES / f"{n}.yaml" for n in ("accelerate_fsdp1", "accelerate_fsdp2", "accelerate_fsdp1_shard_grad_op")
)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def strict(fn, *args):
    """Call fn and fail on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args)


def launcher_env(config: dict) -> dict[str, str]:
    """The variables `accelerate launch` sets for an FSDP config (its utils/launch.py, by hand).

    Launcher defaults first, then the file's fsdp_config values, then str() / .lower() as it does.
    """
    args = {
        "fsdp_version": "1",
        "fsdp_offload_params": "false",
        "fsdp_min_num_params": 10**8,
        "fsdp_sharding_strategy": "FULL_SHARD",
        "fsdp_reshard_after_forward": "true",
        "fsdp_forward_prefetch": "false",
        "fsdp_use_orig_params": "true",
        "fsdp_cpu_ram_efficient_loading": "true",
        "fsdp_sync_module_states": "true",
        "fsdp_activation_checkpointing": "false",
        "fsdp_activation_checkpointing_offload": "false",
    }
    args.update(config["fsdp_config"])
    env = {
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_VERSION": str(args["fsdp_version"]),
        "FSDP_SHARDING_STRATEGY": str(args["fsdp_sharding_strategy"]),
        "FSDP_MIN_NUM_PARAMS": str(args["fsdp_min_num_params"]),
        "ACCELERATE_MIXED_PRECISION": str(config.get("mixed_precision", "no")),
    }
    for key in (
        "reshard_after_forward",
        "offload_params",
        "forward_prefetch",
        "use_orig_params",
        "cpu_ram_efficient_loading",
        "sync_module_states",
        "activation_checkpointing",
        "activation_checkpointing_offload",
    ):
        env[f"FSDP_{key.upper()}"] = str(args[f"fsdp_{key}"]).lower()
    for key, name in (
        ("auto_wrap_policy", "AUTO_WRAP_POLICY"),
        ("backward_prefetch", "BACKWARD_PREFETCH"),
        ("transformer_layer_cls_to_wrap", "TRANSFORMER_CLS_TO_WRAP"),
        ("state_dict_type", "STATE_DICT_TYPE"),
    ):
        if args.get(f"fsdp_{key}") is not None:
            env[f"FSDP_{name}"] = str(args[f"fsdp_{key}"])
    return env


# --- reading Accelerate YAML files --------------------------------------------------------

EXPECTED = {
    FSDP1: FSDPConfig(
        fsdp_version=1,
        sharding_strategy="FULL_SHARD",
        auto_wrap_policy="TRANSFORMER_BASED_WRAP",
        transformer_cls_names_to_wrap=("Block",),
        backward_prefetch="BACKWARD_PRE",
        mixed_precision=MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
        cpu_ram_efficient_loading=True,
        sync_module_states=True,
        use_orig_params=True,
    ),
    FSDP2: FSDPConfig(
        fsdp_version=2,
        reshard_after_forward=True,
        auto_wrap_policy="TRANSFORMER_BASED_WRAP",
        transformer_cls_names_to_wrap=("Block",),
        mixed_precision="bf16",
        cpu_ram_efficient_loading=True,
    ),
    SHARD_GRAD_OP: FSDPConfig(
        fsdp_version=1,
        sharding_strategy="SHARD_GRAD_OP",
        backward_prefetch="BACKWARD_POST",
        forward_prefetch=True,
        auto_wrap_policy="SIZE_BASED_WRAP",
        min_num_params=1000,
        state_dict_type="FULL_STATE_DICT",
        use_orig_params=False,
    ),
}


@pytest.mark.parametrize("path", list(EXPECTED), ids=lambda p: p.stem)
def test_example_files_load_to_the_expected_config_without_warnings(path):
    assert strict(FSDPConfig.from_accelerate_yaml, path) == EXPECTED[path]
    assert strict(FSDPConfig.from_accelerate_yaml, str(path)) == EXPECTED[path]


@pytest.mark.parametrize("path", list(EXPECTED), ids=lambda p: p.stem)
def test_example_files_round_trip_through_accelerate_dict(path, tmp_path):
    """Writing a config back gives the file's own keys and values, and defaults for the keys it left out."""
    original = load(path)
    written = accelerate_dict(FSDPConfig.from_accelerate_yaml(path))
    assert written["distributed_type"] == "FSDP" and written["mixed_precision"] == original["mixed_precision"]
    block = dict(original["fsdp_config"])
    if "fsdp_sharding_strategy" in block:  # FSDP1 files are written the way `accelerate config` writes them
        block["fsdp_reshard_after_forward"] = block.pop("fsdp_sharding_strategy")
    block.setdefault("fsdp_version", 1)
    assert {k: written["fsdp_config"][k] for k in block} == block
    defaults = FSDPConfig(fsdp_version=block["fsdp_version"])
    for key in set(written["fsdp_config"]) - set(block):  # keys the file left out are written with their defaults
        assert written["fsdp_config"][key] == getattr(defaults, YAML_KEY_TO_FIELD[key])
    out = tmp_path / "again.yaml"
    out.write_text(yaml.safe_dump(written))
    assert strict(FSDPConfig.from_accelerate_yaml, out) == EXPECTED[path]


@pytest.mark.parametrize(
    "config",
    [
        FSDPConfig(
            reshard_after_forward=4,
            forward_prefetch=True,
            ignored_modules=["a", "b.*"],
            mixed_precision="fp16",
            auto_wrap_policy="TRANSFORMER_BASED_WRAP",
            transformer_cls_names_to_wrap="Block,Attn",
            cpu_offload=True,
        ),
        FSDPConfig(
            fsdp_version=1,
            sharding_strategy="HYBRID_SHARD_ZERO2",
            backward_prefetch=None,
            ignored_modules="head",
            activation_checkpointing=True,
            min_num_params=7,
        ),
    ],
)
def test_configs_round_trip_through_yaml_files(config, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(accelerate_dict(config)))
    assert strict(FSDPConfig.from_accelerate_yaml, path) == config


def test_accelerate_dict_refuses_what_yaml_cannot_hold():
    with pytest.raises(ValueError, match="auto_wrap_policy is a callable"):
        accelerate_dict(FSDPConfig(auto_wrap_policy=lambda *a: True))
    with pytest.raises(
        ValueError,
        match=r"mixed_precision=MixedPrecision\(.*\) has no Accelerate name; "
        r"accepted: 'no', 'bf16'",
    ):
        accelerate_dict(FSDPConfig(mixed_precision=("bf16", "bf16")))


def test_yaml_details_follow_accelerate():
    base = {"distributed_type": "FSDP"}
    # No fsdp_version means 1; keys without the fsdp_ prefix get it (as `accelerate launch` does).
    block = {"sharding_strategy": "NO_SHARD", "offload_params": True}
    c = strict(config_from_accelerate, base | {"fsdp_config": block})
    assert (c.fsdp_version, c.sharding_strategy, c.cpu_offload) == (1, "NO_SHARD", True)
    # YAML 1.1 reads an unquoted `no` as False.
    assert yaml.safe_load("mixed_precision: no")["mixed_precision"] is False
    unquoted_no = base | {"mixed_precision": False, "fsdp_config": {"fsdp_version": 2}}
    assert config_from_accelerate(unquoted_no).mixed_precision is None
    # An empty fsdp_config is all defaults when distributed_type says FSDP; truth words in strings are parsed.
    assert config_from_accelerate(base | {"fsdp_config": {}}) == FSDPConfig(fsdp_version=1)
    c = config_from_accelerate({"fsdp_config": {"fsdp_version": "2", "fsdp_offload_params": "yes"}})
    assert (c.fsdp_version, c.cpu_offload) == (2, True)
    off = {"fsdp_version": 2, "fsdp_activation_checkpointing_offload": False}
    assert config_from_accelerate(base | {"fsdp_config": off}) == FSDPConfig()


def bad_file(tmp_path, text: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        FSDPConfig.from_accelerate_yaml(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "the file is empty"),
        ("fsdp_config: [unclosed", "not valid YAML (while parsing a flow sequence"),
        ("- a list", "expected a mapping of Accelerate options at the top level, got list"),
        ("distributed_type: MULTI_GPU\nfsdp_config: {}", "distributed_type is 'MULTI_GPU', not 'FSDP'"),
        ("mixed_precision: bf16", "no fsdp_config section"),
        ("distributed_type: FSDP\nfsdp_config: FULL_SHARD", "fsdp_config must be a mapping of fsdp_* keys, got str"),
        (
            "fsdp_config:\n  fsdp_sharding_stratgy: FULL_SHARD",
            "unknown fsdp_config key 'fsdp_sharding_stratgy' (did you mean 'fsdp_sharding_strategy'?); "
            "accepted: fsdp_version,",
        ),
        (
            "fsdp_config:\n  fsdp_sharding_strategy: EVERYWHERE",
            "fsdp_sharding_strategy: sharding_strategy='EVERYWHERE' is not valid; accepted: FULL_SHARD",
        ),
        ("fsdp_config:\n  fsdp_version: 3", "fsdp_version=3 is not valid; accepted: 1 or 2"),
        (
            "fsdp_config:\n  fsdp_offload_params: sometimes",
            "fsdp_offload_params='sometimes' is not valid; accepted: y, yes, t, true, on, 1, n, no, f, false, off, 0",
        ),
        (
            "fsdp_config:\n  fsdp_version: 2\n  fsdp_state_dict_type: LOCAL_STATE_DICT",
            "fsdp_state_dict_type: state_dict_type='LOCAL_STATE_DICT' is not valid (LOCAL_STATE_DICT is obsolete",
        ),
        ("mixed_precision: fp8\nfsdp_config:\n  fsdp_version: 2", "mixed_precision='fp8' is not valid (fp8 needs"),
        (
            "fsdp_config:\n  fsdp_activation_checkpointing_offload: true",
            "fsdp_activation_checkpointing_offload=True is not supported by fsdp_nb; accepted: false",
        ),
    ],
)
def test_bad_files_give_one_line_naming_file_and_problem(tmp_path, text, problem):
    assert problem in bad_file(tmp_path, text)


def test_missing_file_is_a_value_error_naming_it(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ValueError, match=f"^{missing}: cannot read the file \\(No such file or directory\\)$"):
        FSDPConfig.from_accelerate_yaml(missing)


# --- reading the launcher's FSDP_* variables --------------------------------------------------


@pytest.mark.parametrize("path", list(EXPECTED), ids=lambda p: p.stem)
def test_from_env_reads_what_the_launcher_sets_for_each_example(path):
    env = launcher_env(load(path))
    assert strict(FSDPConfig.from_env, env) == EXPECTED[path]


def test_launcher_env_helper_matches_accelerate_for_fsdp2_example():
    env = launcher_env(load(FSDP2))
    # FSDP1-only variables still arrive, with the launcher's defaults; FSDPConfig must not read them for FSDP2.
    assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD" and env["FSDP_SYNC_MODULE_STATES"] == "true"
    assert env["FSDP_RESHARD_AFTER_FORWARD"] == "true" and env["FSDP_VERSION"] == "2"


def test_fsdp1_strategy_from_reshard_variable_unless_sharding_strategy_is_explicit():
    env = launcher_env({"fsdp_config": {"fsdp_version": 1, "fsdp_reshard_after_forward": "SHARD_GRAD_OP"}})
    assert env["FSDP_RESHARD_AFTER_FORWARD"] == "shard_grad_op"  # the launcher lower-cases it
    assert FSDPConfig.from_env(env).sharding_strategy == "SHARD_GRAD_OP"
    assert FSDPConfig.from_env(env | {"FSDP_SHARDING_STRATEGY": "NO_SHARD"}).sharding_strategy == "NO_SHARD"
    assert FSDPConfig.from_env(env | {"FSDP_SHARDING_STRATEGY": "3"}).sharding_strategy == "NO_SHARD"
    assert FSDPConfig.from_env({"FSDP_VERSION": "1"}).sharding_strategy == "FULL_SHARD"


@pytest.mark.parametrize("value, expected", [("false", False), ("True", True), ("2", 2)])
def test_fsdp2_reshard_variable(value, expected):
    env = {"FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": value, "FSDP_SHARDING_STRATEGY": "NO_SHARD"}
    assert strict(FSDPConfig.from_env, env).reshard_after_forward == expected


def test_from_env_defaults_and_os_environ(monkeypatch):
    for name in [n for n in __import__("os").environ if n.startswith("FSDP_") or n == "ACCELERATE_MIXED_PRECISION"]:
        monkeypatch.delenv(name)
    assert FSDPConfig.from_env() == FSDPConfig(fsdp_version=1)  # FSDP_VERSION defaults to 1, as in Accelerate
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "Block,Attention")
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    monkeypatch.setenv("FSDP_IGNORED_MODULES", "head")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    c = FSDPConfig.from_env()
    assert c.transformer_cls_names_to_wrap == ("Block", "Attention") and c.ignored_modules == ("head",)
    assert c.mixed_precision == MixedPrecision(param_dtype=torch.float16) and c.fsdp_version == 2


@pytest.mark.parametrize(
    "env, problem",
    [
        ({"FSDP_VERSION": "3"}, "FSDP_VERSION='3' is not valid; accepted: 1 or 2"),
        ({"FSDP_OFFLOAD_PARAMS": "maybe"}, "FSDP_OFFLOAD_PARAMS='maybe' is not valid; accepted: y, yes, t, true"),
        ({"FSDP_MIN_NUM_PARAMS": "1e8"}, "FSDP_MIN_NUM_PARAMS='1e8' is not valid; accepted: an int >= 0"),
        (
            {"FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "perhaps"},
            "FSDP_RESHARD_AFTER_FORWARD: reshard_after_forward='perhaps' is not valid",
        ),
        ({"FSDP_STATE_DICT_TYPE": "LOCAL_STATE_DICT"}, "FSDP_STATE_DICT_TYPE: state_dict_type='LOCAL_STATE_DICT'"),
        ({"ACCELERATE_MIXED_PRECISION": "fp8"}, "ACCELERATE_MIXED_PRECISION: mixed_precision='fp8' is not valid"),
        (
            {"FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": "true"},
            "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD='true' is not supported",
        ),
    ],
)
def test_from_env_errors_name_the_variable(env, problem):
    with pytest.raises(ValueError) as info:
        FSDPConfig.from_env(env)
    assert str(info.value).startswith(problem)


# --- to-fsdp2 ----------------------------------------------------------------------------------


def test_fsdp1_example_converts_to_the_fsdp2_example():
    """Accelerate: rename the strategy key to a bool, drop four keys, set fsdp_version 2, keep the rest."""
    original = load(FSDP1)
    snapshot = copy.deepcopy(original)
    new, notes = convert_to_fsdp2(original)
    assert original == snapshot  # the input is not modified
    assert new == load(FSDP2)
    assert new["fsdp_config"] == {
        "fsdp_activation_checkpointing": False,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_cpu_ram_efficient_loading": True,
        "fsdp_offload_params": False,
        "fsdp_reshard_after_forward": True,
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_transformer_layer_cls_to_wrap": "Block",
        "fsdp_version": 2,
    }
    assert notes == [
        "fsdp_backward_prefetch: dropped, removed in FSDP2, which always prefetches like BACKWARD_PRE",
        "fsdp_forward_prefetch: dropped, not yet implemented for FSDP2 in Accelerate",
        "fsdp_reshard_after_forward: FULL_SHARD -> fsdp_reshard_after_forward: true",
        "fsdp_sync_module_states: dropped, removed in FSDP2, where it is redundant",
        "fsdp_use_orig_params: dropped, removed in FSDP2, which always uses the original parameters",
        "fsdp_version: set to 2",
    ]


def test_yaml_conversion_agrees_with_dataclass_migration():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        migrated = dataclasses.replace(FSDPConfig.from_accelerate_yaml(FSDP1), fsdp_version=2)
    assert [w.category for w in caught] == [FutureWarning, UserWarning]  # sharding_strategy, sync_module_states
    assert strict(config_from_accelerate, convert_to_fsdp2(load(FSDP1))[0]) == migrated


@pytest.mark.parametrize(
    "strategy, reshard",
    [
        ("FULL_SHARD", True),
        ("SHARD_GRAD_OP", False),
        ("NO_SHARD", False),
        ("HYBRID_SHARD", True),
        ("HYBRID_SHARD_ZERO2", False),
    ],
)
@pytest.mark.parametrize("key", ["fsdp_sharding_strategy", "fsdp_reshard_after_forward"])
def test_every_strategy_maps_like_accelerate(strategy, reshard, key):
    new, notes = convert_to_fsdp2({"fsdp_config": {"fsdp_version": 1, key: strategy}})
    assert new == {"fsdp_config": {"fsdp_version": 2, "fsdp_reshard_after_forward": reshard}}
    assert list(new["fsdp_config"]) == ["fsdp_version", "fsdp_reshard_after_forward"]  # input order is kept
    assert notes[0].startswith(f"{key}: {strategy} -> fsdp_reshard_after_forward: {str(reshard).lower()}")


def test_conversion_keeps_unknown_keys_and_top_level_and_appends_version():
    new, notes = convert_to_fsdp2(
        {
            "mixed_precision": "fp16",
            "num_processes": 8,
            "fsdp_config": {"fsdp_min_num_params": 5, "fsdp_custom": "x", "fsdp_reshard_after_forward": False},
        }
    )
    assert new == {
        "mixed_precision": "fp16",
        "num_processes": 8,
        "fsdp_config": {
            "fsdp_min_num_params": 5,
            "fsdp_custom": "x",
            "fsdp_reshard_after_forward": False,
            "fsdp_version": 2,
        },
    }
    assert list(new["fsdp_config"])[-1] == "fsdp_version" and notes == ["fsdp_version: set to 2"]


@pytest.mark.parametrize(
    "config, note",
    [
        ({"fsdp_config": {"fsdp_version": 2, "fsdp_sharding_strategy": "FULL_SHARD"}}, "fsdp_version is already 2"),
        ({"distributed_type": "MULTI_GPU", "fsdp_config": {}}, "no fsdp_config section"),
        ({"distributed_type": "MULTI_GPU"}, "no fsdp_config section"),
    ],
)
def test_nothing_to_convert_returns_the_config_unchanged(config, note):
    new, notes = convert_to_fsdp2(config)
    assert new == config and new is not config and len(notes) == 1 and notes[0].startswith(note)


def test_conversion_notes_what_accelerate_leaves_for_the_user():
    new, notes = convert_to_fsdp2(
        {
            "fsdp_config": {
                "fsdp_forward_prefetch": True,
                "fsdp_state_dict_type": "LOCAL_STATE_DICT",
                "fsdp_sharding_strategy": "NO_SHARD",
                "fsdp_reshard_after_forward": "WEIRD",
            }
        }
    )
    assert new["fsdp_config"] == {
        "fsdp_state_dict_type": "LOCAL_STATE_DICT",
        "fsdp_reshard_after_forward": "WEIRD",
        "fsdp_version": 2,
    }
    text = "\n".join(notes)
    assert "add `fsdp_forward_prefetch: true` back to use it with fsdp_nb" in text
    assert "LOCAL_STATE_DICT copied unchanged, but FSDP2 has no equivalent; change it to SHARDED_STATE_DICT" in text
    assert "fsdp_sharding_strategy: NO_SHARD -> fsdp_reshard_after_forward: false (FSDP2 has no NO_SHARD" in text
    assert "fsdp_reshard_after_forward: 'WEIRD' is not a sharding strategy or a bool; copied unchanged" in text
    assert "fsdp_reshard_after_forward: False from fsdp_sharding_strategy replaced by 'WEIRD'" in text


@pytest.mark.parametrize(
    "text",
    [
        "dynamo_config: {}\nfsdp_config:\n  fsdp_version: 1\n",  # ruamel keeps no line data for an empty mapping
        "gpu_ids: []\nextra: {a: 1}\nfsdp_config:\n    fsdp_version: 1\n",  # empty list, then a flow mapping
        "fsdp_config: {}\n",
        "a:\n  b: {}\n  c: []\n",
        "gpu_ids:\n    - 0\n    - 1\nfsdp_config:\n    fsdp_version: 1\n",  # a list first: the mapping sets the indent
    ],
)
def test_dump_yaml_round_trips_empty_and_flow_collections(text):
    assert dump_yaml(load_yaml(text)) == text


def test_bare_yaml11_booleans_stay_bare_and_quoted_ones_stay_quoted():
    text = "downcast_bf16: no\nmixed_precision: 'no'\nfsdp_config:\n  fsdp_offload_params: Yes\n  x: [on, OFF]\n"
    assert dump_yaml(load_yaml(text)) == text  # PyYAML, as Accelerate, reads the same values from both
    assert dump_yaml({"downcast_bf16": "no"}) == "downcast_bf16: 'no'\n"  # a plain dict's string stays a string


@pytest.mark.parametrize(
    "block, problem",
    [
        (3, "fsdp_config is 3, not a mapping of fsdp_* keys; write it as `fsdp_config:`"),
        ([], "fsdp_config is a list, not a mapping"),
        ("FULL_SHARD", "fsdp_config is 'FULL_SHARD', not a mapping"),
        (
            {"fsdp_version": "two"},
            "fsdp_config.fsdp_version is 'two'; accepted: 1 (an FSDP1 config, which is converted)",
        ),
        ({"fsdp_version": 2.0}, "fsdp_config.fsdp_version is 2.0; accepted: 1"),
        ({"fsdp_version": True}, "fsdp_config.fsdp_version is True; accepted: 1"),
        ({"fsdp_sharding_strategy": {}}, "fsdp_config.fsdp_sharding_strategy is a mapping, not a sharding strategy"),
        ({"fsdp_reshard_after_forward": ["FULL_SHARD"]}, "fsdp_config.fsdp_reshard_after_forward is a list, not a"),
    ],
)
def test_conversion_refuses_what_its_rules_cannot_apply_to(block, problem):
    config = {"distributed_type": "FSDP", "fsdp_config": block}
    snapshot = copy.deepcopy(config)
    with pytest.raises(ValueError) as info:
        convert_to_fsdp2(config)
    assert str(info.value).startswith(problem) and "\n" not in str(info.value)
    assert config == snapshot


def test_fsdp_version_as_text_or_null_reads_as_accelerate_launch_reads_it():
    two = {"fsdp_config": {"fsdp_sharding_strategy": "FULL_SHARD", "fsdp_version": "2"}}
    assert convert_to_fsdp2(two)[0] == two  # `accelerate launch` passes str(value): "2" is FSDP2 already
    new, _ = convert_to_fsdp2({"fsdp_config": {"fsdp_version": None, "fsdp_sharding_strategy": "NO_SHARD"}})
    assert new == {"fsdp_config": {"fsdp_version": 2, "fsdp_reshard_after_forward": False}}


def test_an_aliased_fsdp_config_is_converted_alone():
    defaults = {"fsdp_sharding_strategy": "SHARD_GRAD_OP", "fsdp_use_orig_params": True}
    new, _ = convert_to_fsdp2({"defaults": defaults, "fsdp_config": defaults})  # what yaml reads from `*defaults`
    assert new["defaults"] == {"fsdp_sharding_strategy": "SHARD_GRAD_OP", "fsdp_use_orig_params": True}
    assert new["fsdp_config"] == {"fsdp_reshard_after_forward": False, "fsdp_version": 2}
