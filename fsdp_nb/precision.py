"""Mixed precision: which dtypes FSDP computes in and reduces gradients in (pure)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from fsdp_nb.validate import invalid

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}
_ALLOWED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dtype_of(field: str, value: Any) -> torch.dtype:
    dtype = _DTYPES.get(value.lower()) if isinstance(value, str) else value
    if dtype not in _ALLOWED_DTYPES:
        raise invalid(field, value, "torch.float32, torch.bfloat16, torch.float16 (or 'fp32', 'bf16', 'fp16')")
    return dtype


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixedPrecision:
    """The dtypes FSDP uses for compute and for gradient communication."""

    param_dtype: torch.dtype
    """dtype the gathered parameters are cast to for forward and backward compute."""
    reduce_dtype: torch.dtype = torch.float32
    """dtype of the gradient reduce-scatter. fp32 by default (Accelerate reduces in the
    param dtype): summing low-precision gradients across ranks drops bits that the fp32
    sharded optimizer step would keep."""
    output_dtype: torch.dtype | None = None
    """dtype the forward outputs are cast to (FSDP2's `output_dtype`); None leaves them as computed."""

    def __post_init__(self):
        object.__setattr__(self, "param_dtype", dtype_of("mixed_precision.param_dtype", self.param_dtype))
        object.__setattr__(self, "reduce_dtype", dtype_of("mixed_precision.reduce_dtype", self.reduce_dtype))
        if self.output_dtype is not None:
            object.__setattr__(self, "output_dtype", dtype_of("mixed_precision.output_dtype", self.output_dtype))


def mixed_precision_of(value: Any) -> MixedPrecision | None:
    """None, a preset name, a MixedPrecision, a dict of its fields or a (param, reduce[, output]) tuple."""
    accepted = "'no', 'bf16', 'fp16', a MixedPrecision, a dict of its fields or a (param, reduce[, output]) dtype tuple"
    if value is None or isinstance(value, MixedPrecision):
        return value
    if isinstance(value, str):
        name = value.strip().lower()
        if name == "no":
            return None
        if name in ("bf16", "fp16"):
            return MixedPrecision(param_dtype=_DTYPES[name])
        why = "fp8 needs float8 linear layers that fsdp_nb does not set up; use bf16" if name == "fp8" else ""
        raise invalid("mixed_precision", value, accepted, why)
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"param_dtype", "reduce_dtype", "output_dtype"})
        if unknown or "param_dtype" not in value:
            why = f"unknown keys {unknown}" if unknown else "param_dtype is required"
            raise invalid("mixed_precision", dict(value), accepted, why)
        return MixedPrecision(**value)
    if isinstance(value, (tuple, list)) and 1 <= len(value) <= 3:
        return MixedPrecision(**dict(zip(("param_dtype", "reduce_dtype", "output_dtype"), value)))
    raise invalid("mixed_precision", value, accepted)
