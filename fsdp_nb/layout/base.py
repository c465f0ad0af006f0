"""What every layout answers, whatever the FSDP version: checks of the inputs, lookups by name and rank. Pure."""

from __future__ import annotations

from collections.abc import Sequence

from fsdp_nb.layout.mesh_layout import dp_placements, shard_size
from fsdp_nb.layout.specs import ParamSpec, Problem, RankBytes


def check_specs(specs: Sequence[ParamSpec]) -> tuple[ParamSpec, ...]:
    specs = tuple(specs)
    if not specs or not all(isinstance(s, ParamSpec) for s in specs):
        raise ValueError("specs must be a non-empty sequence of ParamSpec (see specs_of(module))")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"specs: parameter names must be unique, got {names}")
    return specs


class Layout:
    """Shared lookups of the two layout types; ranks are global ranks of the (R, S) mesh [Note: N-D layouts]."""

    tp = 1  # FSDP1 has no tensor-parallel form; Fsdp2Layout overrides it

    def _check_mesh(self, per_rank_entries: int) -> None:
        shard_size(self.world_size, self.dp_replicate, self.tp)
        if per_rank_entries != self.world_size:
            raise ValueError(f"{type(self).__name__}: {per_rank_entries} rank entries for world_size={self.world_size}")

    @property
    def shard_size(self) -> int:
        """S: the ranks of one shard group (`world_size / (dp_replicate · tp)`)."""
        return self.world_size // (self.dp_replicate * self.tp)

    def placements(self, name: str) -> tuple[str, ...]:
        """torch's placements of `name` as `repr` strings, e.g. `("Replicate()", "Shard(dim=0)")` for HSDP."""
        self._index(name)
        return dp_placements(self.dp_replicate)

    def _index(self, name: str) -> int:
        for i, spec in enumerate(self.params):
            if spec.name == name:
                return i
        raise KeyError(f"unknown parameter {name!r}; this layout has {[s.name for s in self.params]}")

    def _rank(self, rank: int) -> int:
        if not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank!r} must be an int in [0, {self.world_size})")
        return rank

    def param(self, name: str) -> ParamSpec:
        return self.params[self._index(name)]

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "error")

    @property
    def raises(self) -> str | None:
        """What torch raises for this configuration (its first error), or None if it works."""
        return self.errors[0].raises if self.errors else None

    @property
    def bytes_per_rank(self) -> tuple[RankBytes, ...]:
        return tuple(self.bytes(r) for r in range(self.world_size))
