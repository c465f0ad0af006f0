"""FSDPConfig: validation, the FSDP1 -> FSDP2 migration table, from_dict. Pure and fast."""

import dataclasses
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch.distributed.fsdp import BackwardPrefetch, ShardingStrategy, StateDictType

from fsdp_nb.config import FSDPConfig, MixedPrecision
from fsdp_nb.validate import parse_bool

BOOL_FIELDS = (
    "forward_prefetch",
    "cpu_offload",
    "activation_checkpointing",
    "cpu_ram_efficient_loading",
    "use_orig_params",
    "sync_module_states",
)


def quiet(**kwargs) -> FSDPConfig:
    """Build a config and fail if it warns."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return FSDPConfig(**kwargs)


def error(**kwargs) -> str:
    """The message of the ValueError that FSDPConfig(**kwargs) raises."""
    with pytest.raises(ValueError) as info:
        FSDPConfig(**kwargs)
    return str(info.value)


def test_defaults_are_fsdp2_full_reshard_sharded_state_dict():
    c = quiet()
    assert (c.fsdp_version, c.reshard_after_forward, c.sharding_strategy) == (2, True, None)
    assert (c.state_dict_type, c.auto_wrap_policy) == ("SHARDED_STATE_DICT", "NO_WRAP")
    assert c.backward_prefetch == "BACKWARD_PRE"
    assert (c.mixed_precision, c.use_orig_params, c.sync_module_states, c.min_num_params) == (None, True, False, 10**8)


def test_fsdp1_defaults_to_full_shard_and_clears_reshard():
    c = quiet(fsdp_version=1)
    assert (c.sharding_strategy, c.reshard_after_forward) == ("FULL_SHARD", None)


@pytest.mark.parametrize("bad", [3, 0, "2", 2.0, True, None])
def test_fsdp_version_error_names_field_value_and_choices(bad):
    with pytest.raises(ValueError, match=re.escape(f"fsdp_version={bad!r} is not valid; accepted: 1 or 2")):
        FSDPConfig(fsdp_version=bad)


def test_config_is_frozen_hashable_and_compared_by_value():
    a, b = quiet(cpu_offload=True), quiet(cpu_offload=True)
    assert a == b and hash(a) == hash(b) and a != quiet()
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.cpu_offload = False


# --- sharding_strategy / reshard_after_forward (row 1 of the migration table) -----------------


@pytest.mark.parametrize(
    "given, name",
    [
        ("FULL_SHARD", "FULL_SHARD"),
        ("shard_grad_op", "SHARD_GRAD_OP"),
        (3, "NO_SHARD"),
        ("4", "HYBRID_SHARD"),
        (5, "HYBRID_SHARD_ZERO2"),
        (ShardingStrategy.SHARD_GRAD_OP, "SHARD_GRAD_OP"),
        (ShardingStrategy._HYBRID_SHARD_ZERO2, "HYBRID_SHARD_ZERO2"),
    ],
)
def test_fsdp1_sharding_strategy_accepts_names_torch_ints_and_enums(given, name):
    assert quiet(fsdp_version=1, sharding_strategy=given).sharding_strategy == name


@pytest.mark.parametrize("bad", ["FULL", 0, 6, True])
def test_bad_sharding_strategy_lists_accepted_values(bad):
    assert error(fsdp_version=1, sharding_strategy=bad) == (
        f"sharding_strategy={bad!r} is not valid; accepted: FULL_SHARD, SHARD_GRAD_OP, NO_SHARD, HYBRID_SHARD, "
        "HYBRID_SHARD_ZERO2 or the ints [1, 2, 3, 4, 5]"
    )


@pytest.mark.parametrize(
    "strategy, reshard, lost",
    [
        ("FULL_SHARD", True, None),
        ("SHARD_GRAD_OP", False, None),
        ("NO_SHARD", False, "for pure replication use DDP"),
        ("HYBRID_SHARD", True, "2-D device mesh"),
        ("HYBRID_SHARD_ZERO2", False, "2-D device mesh"),
    ],
)
@pytest.mark.parametrize("field", ["sharding_strategy", "reshard_after_forward"])
def test_fsdp2_converts_strategy_to_reshard_with_future_warning(strategy, reshard, lost, field):
    expected = f"sharding_strategy='{strategy}'.*becomes reshard_after_forward={reshard}"
    with pytest.warns(FutureWarning, match=expected) as rec:
        c = FSDPConfig(**{field: strategy})
    assert (c.reshard_after_forward, c.sharding_strategy) == (reshard, None)
    message = str(rec[0].message)
    assert (lost in message) if lost else ("mesh" not in message and "DDP" not in message)


def test_fsdp2_strategy_and_reshard_agreeing_is_fine_disagreeing_is_an_error():
    with pytest.warns(FutureWarning):
        assert FSDPConfig(sharding_strategy="SHARD_GRAD_OP", reshard_after_forward=False).reshard_after_forward is False
    with pytest.raises(
        ValueError,
        match="sharding_strategy='FULL_SHARD' means reshard_after_forward=True but "
        "reshard_after_forward=False was given",
    ):
        FSDPConfig(sharding_strategy="FULL_SHARD", reshard_after_forward=False)
    with pytest.raises(ValueError, match="disagree; with fsdp_version=2 set only reshard_after_forward"):
        FSDPConfig(sharding_strategy="FULL_SHARD", reshard_after_forward="SHARD_GRAD_OP")


@pytest.mark.parametrize("given, expected", [(False, False), ("true", True), ("off", False), (4, 4), ("8", 8)])
def test_fsdp2_reshard_accepts_bools_truth_words_and_ints(given, expected):
    assert quiet(reshard_after_forward=given).reshard_after_forward == expected


@pytest.mark.parametrize("bad", [1, 0, -2, "maybe", 2.5])
def test_bad_reshard_after_forward_names_field_and_choices(bad):
    message = error(reshard_after_forward=bad)
    assert message.startswith(f"reshard_after_forward={bad!r} is not valid")
    assert "accepted: True, False, an int >= 2 (FSDP2) or one of FULL_SHARD" in message


@pytest.mark.parametrize(
    "reshard, strategy", [(True, "FULL_SHARD"), (False, "SHARD_GRAD_OP"), ("hybrid_shard", "HYBRID_SHARD")]
)
def test_fsdp1_folds_reshard_after_forward_into_sharding_strategy(reshard, strategy):
    c = quiet(fsdp_version=1, reshard_after_forward=reshard)
    assert (c.sharding_strategy, c.reshard_after_forward) == (strategy, None)


def test_fsdp1_rejects_int_reshard_and_conflicts():
    assert error(fsdp_version=1, reshard_after_forward=4).startswith(
        "reshard_after_forward=4 is not valid (resharding to a smaller world is FSDP2 only; set fsdp_version=2)"
    )
    assert error(fsdp_version=1, sharding_strategy="FULL_SHARD", reshard_after_forward="SHARD_GRAD_OP") == (
        "sharding_strategy='FULL_SHARD' and reshard_after_forward='SHARD_GRAD_OP' disagree; "
        "with fsdp_version=1 set only sharding_strategy"
    )
    hybrid = quiet(fsdp_version=1, sharding_strategy="HYBRID_SHARD", reshard_after_forward=True)
    assert hybrid.sharding_strategy == "HYBRID_SHARD"


def test_validate_for_world_checks_int_reshard_divides_world():
    quiet(reshard_after_forward=4).validate_for_world(8)
    quiet(reshard_after_forward=3).validate_for_world(6)
    quiet(reshard_after_forward=True).validate_for_world(3)
    with pytest.raises(ValueError) as info:
        quiet(reshard_after_forward=3).validate_for_world(2)
    assert str(info.value) == (
        "reshard_after_forward=3 does not divide world size 2; "
        "use True or False (2 has no divisor strictly between 1 and 2)"
    )
    with pytest.raises(ValueError) as info:
        quiet(reshard_after_forward=4).validate_for_world(6)
    assert str(info.value) == (
        "reshard_after_forward=4 does not divide world size 6; use True, False or a divisor of 6 in [2, 3]"
    )
    with pytest.raises(ValueError, match="reshard_after_forward=4 is not smaller than world size 4"):
        quiet(reshard_after_forward=4).validate_for_world(4)
    with pytest.raises(ValueError, match=re.escape("world_size=0 is not valid; accepted: an int >= 1")):
        quiet().validate_for_world(0)


def test_replace_migrates_between_versions_and_same_version_replace_is_silent():
    old = quiet(fsdp_version=1, sharding_strategy="SHARD_GRAD_OP")
    with pytest.warns(FutureWarning, match="sharding_strategy='SHARD_GRAD_OP'"):
        new = dataclasses.replace(old, fsdp_version=2)
    assert (new.reshard_after_forward, new.sharding_strategy) == (False, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dataclasses.replace(new, cpu_offload=True).reshard_after_forward is False
        assert dataclasses.replace(new, fsdp_version=1).sharding_strategy == "SHARD_GRAD_OP"


# --- rows removed in FSDP2 ---------------------------------------------------------------


@pytest.mark.parametrize(
    "given, name",
    [
        ("backward_post", "BACKWARD_POST"),
        (1, "BACKWARD_PRE"),
        (BackwardPrefetch.BACKWARD_POST, "BACKWARD_POST"),
        ("NO_PREFETCH", None),
        (None, None),
    ],
)
def test_fsdp1_backward_prefetch_values(given, name):
    assert quiet(fsdp_version=1, backward_prefetch=given).backward_prefetch == name


def test_bad_backward_prefetch_lists_choices():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "backward_prefetch='PRE' is not valid; accepted: BACKWARD_PRE, "
            "BACKWARD_POST, NO_PREFETCH or the ints [1, 2]"
        ),
    ):
        FSDPConfig(fsdp_version=1, backward_prefetch="PRE")


@pytest.mark.parametrize(
    "field, value, fsdp2_value, why",
    [
        ("backward_prefetch", "BACKWARD_POST", "BACKWARD_PRE", "always prefetches"),
        ("backward_prefetch", None, "BACKWARD_PRE", "always prefetches"),
        ("sync_module_states", True, False, "redundant in FSDP2"),
        ("use_orig_params", False, True, "always uses the original parameters"),
    ],
)
def test_fsdp2_ignores_removed_options_with_user_warning(field, value, fsdp2_value, why):
    with pytest.warns(UserWarning, match=f"{field}={value!r} is ignored with fsdp_version=2: .*{why}"):
        c = FSDPConfig(**{field: value})
    assert getattr(c, field) == fsdp2_value
    assert getattr(quiet(fsdp_version=1, **{field: value}), field) == (None if value is None else value)


def test_forward_prefetch_is_kept_for_fsdp2_without_warning():
    assert quiet(forward_prefetch=True).forward_prefetch is True


def test_cpu_ram_efficient_loading_forces_sync_in_fsdp1_only():
    with pytest.warns(UserWarning, match="sync_module_states=False is set to True"):
        assert FSDPConfig(fsdp_version=1, cpu_ram_efficient_loading=True).sync_module_states is True
    assert quiet(cpu_ram_efficient_loading=True).sync_module_states is False


@pytest.mark.parametrize(
    "given, name",
    [
        ("sharded_state_dict", "SHARDED_STATE_DICT"),
        ("FULL_STATE_DICT", "FULL_STATE_DICT"),
        (1, "FULL_STATE_DICT"),
        (StateDictType.SHARDED_STATE_DICT, "SHARDED_STATE_DICT"),
    ],
)
def test_state_dict_type_values(given, name):
    assert quiet(state_dict_type=given).state_dict_type == name


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("local", ["LOCAL_STATE_DICT", "local_state_dict", 2, StateDictType.LOCAL_STATE_DICT])
def test_local_state_dict_is_rejected_with_the_reason(version, local):
    message = error(fsdp_version=version, state_dict_type=local)
    assert message.startswith(f"state_dict_type={local!r} is not valid (LOCAL_STATE_DICT is obsolete: ")
    assert message.endswith(
        "FSDP2 has no equivalent; use SHARDED_STATE_DICT); accepted: SHARDED_STATE_DICT, FULL_STATE_DICT"
    )


# --- other fields -----------------------------------------------------------------------


@pytest.mark.parametrize("field", BOOL_FIELDS)
def test_bool_fields_reject_non_bools(field):
    with pytest.raises(ValueError, match=re.escape(f"{field}='yes' is not valid; accepted: True or False")):
        FSDPConfig(fsdp_version=1, **{field: "yes"})


def test_auto_wrap_policy_names_none_and_callables():
    assert quiet(auto_wrap_policy="transformer_based_wrap").auto_wrap_policy == "TRANSFORMER_BASED_WRAP"
    assert quiet(auto_wrap_policy=None).auto_wrap_policy == "NO_WRAP"
    policy = lambda module, recurse, nonwrapped_numel: True  # noqa: E731
    assert quiet(auto_wrap_policy=policy).auto_wrap_policy is policy
    with pytest.raises(
        ValueError,
        match=re.escape(
            "auto_wrap_policy='BLOCKS' is not valid; accepted: TRANSFORMER_BASED_WRAP, SIZE_BASED_WRAP, NO_WRAP"
        ),
    ):
        FSDPConfig(auto_wrap_policy="BLOCKS")


def test_transformer_cls_names_accept_list_or_comma_string():
    wrap = "TRANSFORMER_BASED_WRAP"

    def names(value):
        return quiet(auto_wrap_policy=wrap, transformer_cls_names_to_wrap=value).transformer_cls_names_to_wrap

    assert names("Block, Attention") == ("Block", "Attention") and names(["Block"]) == ("Block",)
    assert error(auto_wrap_policy=wrap, transformer_cls_names_to_wrap="Block,") == (
        "transformer_cls_names_to_wrap='Block,' is not valid; accepted: a list of non-empty strings "
        "or a comma-separated string"
    )
    assert error(auto_wrap_policy=wrap, transformer_cls_names_to_wrap="my.Block") == (
        "transformer_cls_names_to_wrap='my.Block' is not valid; accepted: Python class names such as 'Block'"
    )
    ignored = r"transformer_cls_names_to_wrap=\['Block'\] is ignored: auto_wrap_policy is 'SIZE_BASED_WRAP'"
    with pytest.warns(UserWarning, match=ignored):
        FSDPConfig(auto_wrap_policy="SIZE_BASED_WRAP", transformer_cls_names_to_wrap="Block")


@pytest.mark.parametrize("bad", [-1, True, "10", 1.5])
def test_min_num_params_must_be_a_non_negative_int(bad):
    with pytest.raises(ValueError, match=re.escape(f"min_num_params={bad!r} is not valid; accepted: an int >= 0")):
        FSDPConfig(min_num_params=bad)
    assert quiet(min_num_params=1e3).min_num_params == 1000


@pytest.mark.parametrize(
    "given, expected",
    [
        ("no", None),
        (None, None),
        ("bf16", MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)),
        ("fp16", MixedPrecision(param_dtype=torch.float16, reduce_dtype=torch.float32)),
        (("bf16", "bf16"), MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)),
        (
            (torch.bfloat16, torch.float32, torch.float32),
            MixedPrecision(param_dtype=torch.bfloat16, output_dtype=torch.float32),
        ),
        ({"param_dtype": "float16"}, MixedPrecision(param_dtype=torch.float16)),
    ],
)
def test_mixed_precision_presets_pairs_and_dicts(given, expected):
    got = quiet(mixed_precision=given).mixed_precision
    assert got == expected
    if got is not None:
        assert isinstance(got.param_dtype, torch.dtype) and got.reduce_dtype == expected.reduce_dtype


def test_mixed_precision_errors_name_field_value_and_choices():
    assert re.fullmatch(
        r"mixed_precision='fp8' is not valid \(fp8 needs float8 linear layers.*\); "
        r"accepted: 'no', 'bf16', 'fp16', a MixedPrecision, .*",
        error(mixed_precision="fp8"),
    )
    assert error(mixed_precision={"param_dtype": "bf16", "buffer_dtype": "bf16"}).startswith(
        "mixed_precision={'param_dtype': 'bf16', 'buffer_dtype': 'bf16'} is not valid (unknown keys ['buffer_dtype'])"
    )
    assert error(mixed_precision=(torch.float64,)) == (
        "mixed_precision.param_dtype=torch.float64 is not valid; "
        "accepted: torch.float32, torch.bfloat16, torch.float16 "
        "(or 'fp32', 'bf16', 'fp16')"
    )
    with pytest.raises(ValueError, match=re.escape("mixed_precision.reduce_dtype='int8' is not valid")):
        MixedPrecision(param_dtype="bf16", reduce_dtype="int8")


def test_ignored_modules_are_names_or_valid_regexes():
    assert quiet(ignored_modules="layers\\.0\\..*").ignored_modules == ("layers\\.0\\..*",)
    assert quiet(ignored_modules=["head", "emb"]).ignored_modules == ("head", "emb")
    assert error(ignored_modules="layers.(").startswith(
        "ignored_modules='layers.(' is not valid (missing ), unterminated subpattern"
    )
    assert error(ignored_modules=5) == "ignored_modules=5 is not valid; accepted: a list of non-empty strings"


# --- from_dict -----------------------------------------------------------------------------


def test_from_dict_round_trips_asdict():
    c = quiet(
        fsdp_version=1,
        sharding_strategy="HYBRID_SHARD",
        mixed_precision="bf16",
        ignored_modules="x",
        auto_wrap_policy="TRANSFORMER_BASED_WRAP",
        transformer_cls_names_to_wrap="Block",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert FSDPConfig.from_dict(dataclasses.asdict(c)) == c


def test_from_dict_unknown_key_suggests_close_matches_and_lists_fields():
    with pytest.raises(
        ValueError,
        match=r"unknown FSDPConfig field 'sharding_stratgy' \(did you mean "
        r"'sharding_strategy'\?\); accepted: fsdp_version, reshard_after_forward, "
        r".*ignored_modules$",
    ):
        FSDPConfig.from_dict({"sharding_stratgy": "FULL_SHARD"})
    with pytest.raises(
        ValueError,
        match=r"'fsdp_transformer_layer_cls_to_wrap' \(that is Accelerate's YAML key; "
        r"the field is 'transformer_cls_names_to_wrap'\)",
    ):
        FSDPConfig.from_dict({"fsdp_transformer_layer_cls_to_wrap": "Block"})
    with pytest.raises(ValueError, match=r"unknown FSDPConfig field 'zzz'; accepted:"):
        FSDPConfig.from_dict({"zzz": 1})
    with pytest.raises(ValueError, match=r"FSDPConfig.from_dict argument=\['cpu_offload'\] is not valid"):
        FSDPConfig.from_dict(["cpu_offload"])


def test_parse_bool_uses_accelerates_truth_words():
    assert [parse_bool("X", w) for w in ("y", "Yes", "T", "true", "on", "1")] == [True] * 6
    assert [parse_bool("X", w) for w in ("n", "No", "F", "false", "off", "0")] == [False] * 6
    with pytest.raises(ValueError, match=re.escape("X='maybe' is not valid; accepted: y, yes, t, true, on, 1, n, no")):
        parse_bool("X", "maybe")


def test_unknown_keyword_names_close_fields_and_accepted_ones():
    with pytest.raises(
        TypeError,
        match=r"unknown FSDPConfig field 'fsdp_verison' \(did you mean 'fsdp_version'\?\); accepted: fsdp_version, ",
    ):
        FSDPConfig(fsdp_verison=2)


def test_warnings_point_at_the_users_line():
    """Not at config.py: the warning's filename is this test file, however the config is built."""
    import dataclasses

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        FSDPConfig(fsdp_version=2, sync_module_states=True)  # UserWarning
        FSDPConfig(fsdp_version=2, sharding_strategy="FULL_SHARD")  # FutureWarning
        dataclasses.replace(quiet(fsdp_version=1), fsdp_version=2)  # FutureWarning, via dataclasses.py
    assert len(caught) == 3
    assert {Path(w.filename).name for w in caught} == {Path(__file__).name}, [w.filename for w in caught]
