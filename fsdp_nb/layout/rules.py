"""What FSDP1 and FSDP2 refuse (or regret), worded for users, with the exact error torch raises.

The checks mirror torch 2.13 in order, so the first error listed is the one torch
raises: FSDP1 `_verify_managed_params` then `FlatParamHandle._validate_tensors_to_flatten`
(each tensor compared with the one before it), at wrap time; FSDP2
`_verify_managed_param` at wrap time, then `FSDPParamGroup._init_mp_dtypes`, which
runs at the first forward and only looks at trainable parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

from fsdp_nb.layout.specs import ParamSpec, Problem


def _error(when: str, raises: str, message: str) -> Problem:
    return Problem(severity="error", when=when, raises=raises, message=message)


def _scalar_error(who: str, name: str) -> Problem:
    return _error(
        "at wrap time",
        f"ValueError: {who} doesn't support scalar parameters. Change {name} to a 1D tensor with numel equal to 1.",
        f"{name} is a 0-dim tensor; FSDP shards along a dimension, so it needs at least one.",
    )


def _names(specs) -> str:
    return ", ".join(s.name for s in specs) + (" is" if len(specs) == 1 else " are")


def fsdp1_problems(specs: Sequence[ParamSpec], use_orig_params: bool) -> tuple[Problem, ...]:
    """What FSDP1 says about flattening `specs` into one FlatParameter, in torch's check order."""
    problems = []
    scalar = next((s for s in specs if s.shape == ()), None)
    if scalar is not None:  # `_verify_managed_params` runs before flattening
        problems.append(_scalar_error("FSDP", scalar.name))
    if not specs[0].dtype.is_floating_point:
        problems.append(
            _error(
                "at wrap time",
                "ValueError: Cannot flatten integer dtype tensors",
                f"{specs[0].name} is {specs[0].dtype}; a FlatParameter must be floating point.",
            )
        )
    # Mirrors `_validate_tensors_to_flatten`: each tensor is compared with the one before it.
    seen_dtype = seen_grad = False
    for prev, spec in zip(specs, specs[1:]):
        if spec.dtype != prev.dtype and not seen_dtype:
            seen_dtype = True
            problems.append(
                _error(
                    "at wrap time",
                    f"ValueError: Must flatten tensors with uniform dtype but got {prev.dtype} and {spec.dtype}",
                    f"{spec.name} is {spec.dtype} but {prev.name} before it is {prev.dtype}. "
                    "FSDP1 concatenates a wrapped module's parameters into ONE flat tensor, "
                    "and a tensor has one dtype. Wrap that layer in its own FSDP unit, cast it, "
                    "or use FSDP2 (one DTensor per parameter).",
                )
            )
        if spec.requires_grad != specs[0].requires_grad and not seen_grad:
            seen_grad = True
            frozen = [s for s in specs if not s.requires_grad]
            if not use_orig_params:
                problems.append(
                    _error(
                        "at wrap time",
                        "ValueError: Must flatten tensors with uniform `requires_grad` when `use_orig_params=False`",
                        f"{_names(frozen)} frozen but share a FlatParameter with trainable parameters; with "
                        "use_orig_params=False the FlatParameter is one nn.Parameter with one requires_grad flag. Use "
                        "use_orig_params=True, wrap the frozen layer separately, or use FSDP2.",
                    )
                )
            else:
                total, trainable = sum(s.numel for s in specs), sum(s.numel for s in specs if s.requires_grad)
                problems.append(
                    Problem(
                        severity="warning",
                        when="at wrap time",
                        message=f"{_names(frozen)} frozen but share a FlatParameter with trainable parameters: FSDP1 "
                        f"keeps a gradient for the whole FlatParameter, so gradient memory covers {total} elements "
                        f"instead of {trainable} (torch warns about this only when an auto_wrap_policy is given).",
                    )
                )
    return tuple(problems)


def fsdp2_problems(specs: Sequence[ParamSpec], groups: Sequence[str]) -> tuple[Problem, ...]:
    """What `fully_shard` says about `specs`, given each parameter's group (the module it was called on)."""
    problems = []
    scalar = next((s for s in specs if s.shape == ()), None)
    if scalar is not None:  # `_verify_managed_param`, at wrap time
        problems.append(_scalar_error("fully_shard", scalar.name))
    for group in dict.fromkeys(groups):
        # Only trainable parameters count: frozen ones are never reduce-scattered.
        dtypes = list(dict.fromkeys(s.dtype for s, g in zip(specs, groups) if g == group and s.requires_grad))
        if len(dtypes) > 1:
            listed = ", ".join(map(str, dtypes))
            problems.append(
                _error(
                    "at the first forward",
                    "AssertionError: FSDP expects uniform original parameter dtype but got {" + listed + "}",
                    f"fully_shard({group or 'root'}) groups trainable parameters of dtypes {listed}; one group is "
                    "all-gathered and reduce-scattered as one buffer. Give the odd layer its own fully_shard call.",
                )
            )
    return tuple(problems)


# Torch's messages for the refusals above, and what they mean, for errors raised on ranks.
_EXPLAINED = (
    (
        "Must flatten tensors with uniform `requires_grad`",
        "FSDP1 with use_orig_params=False concatenates a wrapped module's parameters into ONE FlatParameter, "
        "an nn.Parameter with a single requires_grad flag, so frozen and trainable parameters cannot share it. "
        "Use use_orig_params=True, wrap the frozen layer in its own FSDP unit, or use FSDP2 (fully_shard), "
        "where each parameter keeps its own flag.",
    ),
    (
        "Must flatten tensors with uniform dtype",
        "FSDP1 concatenates a wrapped module's parameters into ONE flat tensor, and a tensor has one dtype. "
        "Wrap the odd-dtype layer in its own FSDP unit, cast it, or use FSDP2 (one DTensor per parameter).",
    ),
    (
        "FSDP expects uniform original parameter dtype",
        "One fully_shard group all-gathers and reduce-scatters its trainable parameters as one buffer, so they "
        "must share a dtype. Call fully_shard on the odd-dtype layer first, giving it its own group.",
    ),
    (
        "doesn't support scalar parameters",
        "FSDP shards along a dimension, so a 0-dim parameter has nothing to split: make it shape (1,).",
    ),
)


def explain(message: str) -> str | None:
    """What a known FSDP error means and what to do, or None for errors we do not know."""
    for fragment, why in _EXPLAINED:
        if fragment in message:
            return why
    return None
