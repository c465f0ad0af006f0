"""The shared types of the layout core: a leaf module (of fsdp_nb it imports only `validate`).

`ParamSpec` describes one parameter, `Segment` a run of flat elements, `RankBytes`
one rank's bytes, and `Problem` what torch refuses. The layout model, the rules,
the live inspection and the figures all speak these types; keeping them here,
below all of those, is what keeps the layout core free of import cycles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from fsdp_nb.validate import is_int


class Segment(NamedTuple):
    """Elements `start:stop` of parameter `name`, flattened; `name=None` is padding (`0:n`)."""

    name: str | None
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ParamSpec:
    """What the layout math needs to know about one parameter: `ParamSpec("l2.weight", (6, 6))`.

    Positional, like the issue's contract `ParamSpec(name, shape, dtype, requires_grad)`.
    """

    name: str
    """Full name as in `module.named_parameters()`, e.g. "l2.weight"."""
    shape: tuple[int, ...]
    """Unsharded shape; every dim positive. `()` is a scalar (both FSDP versions reject it)."""
    dtype: torch.dtype = torch.float32
    """Storage dtype of the parameter."""
    requires_grad: bool = True
    """False for frozen parameters."""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"ParamSpec: name={self.name!r} must be a non-empty string like 'l1.weight'")
        shape = tuple(self.shape)
        for i, dim in enumerate(shape):
            if not is_int(dim) or dim <= 0:
                raise ValueError(
                    f"ParamSpec({self.name!r}): shape={shape} has dim {i} = {dim!r}; every dim must be a positive int"
                )
        object.__setattr__(self, "shape", shape)
        if not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"ParamSpec({self.name!r}): dtype={self.dtype!r} must be a torch.dtype like torch.float32")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize


def specs_of(module: nn.Module) -> tuple[ParamSpec, ...]:
    """The parameters of an unsharded module, in `named_parameters()` order."""
    return tuple(
        ParamSpec(name=n, shape=tuple(p.shape), dtype=p.dtype, requires_grad=p.requires_grad)
        for n, p in module.named_parameters()
    )


@dataclass(frozen=True, kw_only=True)
class RankBytes:
    """Bytes on one rank, split into real data and padding."""

    real: int
    padding: int

    @property
    def total(self) -> int:
        return self.real + self.padding


@dataclass(frozen=True, kw_only=True)
class Problem:
    """Why torch would reject (severity "error") or regret (severity "warning") a configuration."""

    severity: str
    """"error" (torch raises) or "warning" (it works, at a cost)."""
    message: str
    """The explanation, in the user's terms."""
    raises: str = ""
    """What torch raises, e.g. "ValueError: Must flatten tensors ..."; empty for warnings."""
    when: str = ""
    """When torch raises: "at wrap time" or "at the first forward"."""

    def __post_init__(self):
        if self.severity not in ("error", "warning"):
            raise ValueError(f"Problem: severity={self.severity!r} must be 'error' or 'warning'")
