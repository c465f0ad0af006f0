"""Mesh sizes in Accelerate's names, and the mesh they give on a world of ranks. Pure.

Accelerate's `ParallelismConfig` sizes the device mesh with `dp_replicate_size` (R),
`dp_shard_size` (S) and `tp_size` (T), whose product is the world size. A YAML file
holds them in a top-level `parallelism_config:` section (keys keep the
`parallelism_config_` prefix: `accelerate launch` copies them to its arguments as
written), and the launcher passes them on as `PARALLELISM_CONFIG_*` variables, which
Accelerate reads only when ACCELERATE_USE_PARALLELISM_CONFIG is true. Context and
sequence parallelism (`cp_size`, `sp_size`) are not implemented: accepted at 1 only.

[Note: mesh sizes]
- W ranks form an (R, S) grid, row-major as torch numbers a mesh: rank = r·S + s.
  A row (consecutive ranks: one node under torchrun) splits each parameter between
  its S ranks; a column holds R copies of the same shard. Every one of the W ranks
  is data parallel: each takes its own rows of the batch, and gradients are averaged
  over all of them (reduce-scatter in the row, all-reduce down the column).
- `dp_shard_size=None` is resolved here, against the world: S = W / (R·T).
- FSDP1 replicates only in its hybrid strategies. Without `dp_replicate_size` (left at
  1), R is the number of nodes, W / LOCAL_WORLD_SIZE, as FSDP1 itself takes its
  intra-node group as the shard group. On one machine that is R = 1: HYBRID_SHARD is
  then FULL_SHARD with an all-reduce over a group of one, so fsdp_nb runs FULL_SHARD
  (SHARD_GRAD_OP for HYBRID_SHARD_ZERO2) and warns, suggesting `dp_replicate_size`.
  A warning, not an error: the training is right, it is what torch does on one node,
  and a multi-node config opened on a laptop should still run there.
- An explicit `mesh=` wins over the sizes the config leaves at their defaults (1, None,
  1). A size the config sets and the mesh contradicts is an error, never a silent pick.
- FSDP2 takes R > 1 as HSDP, on a mesh with dim names ("dp_replicate", "dp_shard").
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fsdp_nb.validate import invalid, is_int, parse_bool

SECTION, SWITCH = "parallelism_config", "ACCELERATE_USE_PARALLELISM_CONFIG"
# (FSDPConfig field, YAML key in the `parallelism_config:` section, variable)
SIZES: tuple[tuple[str, str, str], ...] = tuple(
    (field, f"{SECTION}_{field}", f"PARALLELISM_CONFIG_{field.upper()}")
    for field in ("dp_replicate_size", "dp_shard_size", "tp_size")
)
KEY_TO_FIELD = {key: field for field, key, _ in SIZES}
YAML_NAMES = {field: key for field, key, _ in SIZES}
ENV_NAMES = {field: env for field, _, env in SIZES}
UNSUPPORTED = {f"{SECTION}_{n}_size": f"PARALLELISM_CONFIG_{n.upper()}_SIZE" for n in ("cp", "sp")}
# Keys that only matter when context or sequence parallelism is on (a size > 1): read and left alone.
IGNORED_KEYS = tuple(
    f"{SECTION}_{n}"
    for n in ("cp_backend", "cp_comm_strategy", "sp_backend", "sp_seq_length", "sp_seq_length_is_variable")
) + (f"{SECTION}_sp_attn_implementation",)
MESH_DIM_NAMES = ("dp_replicate", "dp_shard")  # Accelerate's and torchtitan's names for the 2-D mesh
HYBRID = {"HYBRID_SHARD": "FULL_SHARD", "HYBRID_SHARD_ZERO2": "SHARD_GRAD_OP"}  # and what each is with R = 1


# ---- reading and writing Accelerate's spellings ------------------------------------------


def sizes_from_yaml(block: Any) -> dict[str, Any]:
    """`FSDPConfig` keyword arguments from a `parallelism_config:` section; a size left out keeps its default."""
    if block is None:
        return {}
    if not isinstance(block, Mapping):
        raise ValueError(f"{SECTION} must be a mapping of {SECTION}_* keys, got {type(block).__name__}")
    kwargs: dict[str, Any] = {}
    for key, value in block.items():
        if key in UNSUPPORTED:
            _check_off(key, value)
        elif key in KEY_TO_FIELD:
            text = value.strip() if isinstance(value, str) else None
            kwargs[KEY_TO_FIELD[key]] = int(text) if text and text.isdigit() else value
        elif key not in IGNORED_KEYS:
            known = list(KEY_TO_FIELD) + list(UNSUPPORTED)
            close = difflib.get_close_matches(str(key), known, n=2) or difflib.get_close_matches(
                f"{SECTION}_{key}", known, n=2
            )
            hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
            raise ValueError(f"unknown {SECTION} key {key!r}{hint}; accepted: {', '.join(known)}")
    return kwargs


def sizes_from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The `PARALLELISM_CONFIG_*` sizes, read only under ACCELERATE_USE_PARALLELISM_CONFIG, as Accelerate reads them.

    `accelerate launch` sets every size once the file has a `parallelism_config:`
    section, 1 for the ones it leaves out; a 1 reads as 1, as in Accelerate.
    """
    if SWITCH not in environ or not parse_bool(SWITCH, environ[SWITCH]):
        return {}
    kwargs: dict[str, Any] = {}
    for field, _, env in SIZES:
        if env in environ:
            text = environ[env].strip()
            if not text.isdigit():
                raise ValueError(f"{env}={environ[env]!r} is not valid; accepted: an int >= 1")
            kwargs[field] = int(text)
    for env in UNSUPPORTED.values():
        if env in environ:
            _check_off(env, environ[env])
    return kwargs


def sizes_to_yaml(config) -> dict[str, int] | None:
    """The `parallelism_config:` section of a config, or None when every size is at its default.

    A `dp_shard_size` of None (world / (R·T)) is left out. `accelerate launch` would
    read a missing size as 1, so a file for Accelerate itself needs it written out.
    """
    sizes = {key: getattr(config, field) for field, key, _ in SIZES}
    if all(size in (None, 1) for size in sizes.values()):
        return None
    return {key: size for key, size in sizes.items() if size is not None}


def _check_off(name: str, value: Any) -> None:
    if str(value).strip() != "1":
        raise ValueError(
            f"{name}={value!r} is not supported by fsdp_nb (no context or sequence parallelism); accepted: 1"
        )


# ---- the mesh on a world of ranks [Note: mesh sizes] -------------------------------------


@dataclass(frozen=True)
class MeshPlan:
    """The mesh `shard()` builds (or checked a given one against): its shape, TP size and FSDP1 strategy."""

    shape: tuple[int, ...]
    """(S,) for a 1-D mesh, (R, S) for a 2-D (replicate, shard) one; R·S·tp is the world size."""
    tp: int = 1
    """Ranks of one tensor-parallel group: FSDP2 only, the mesh's last dim ("tp") when > 1."""
    strategy: str | None = None
    """FSDP1: the strategy torch runs (HYBRID_SHARD becomes FULL_SHARD with R = 1); None for FSDP2."""
    note: str | None = None
    """A warning for the user (FSDP1's hybrid strategy on one machine), or None."""

    @property
    def shard(self) -> int:
        return self.shape[-1]


def plan_mesh(
    config, world_size: int, *, local_world_size: int | None = None, mesh_shape: tuple[int, ...] | None = None
) -> MeshPlan:
    """The mesh for `config` (an `FSDPConfig`) on `world_size` ranks; every refusal is one ValueError line.

    `local_world_size` is the ranks per node (LOCAL_WORLD_SIZE; default: all ranks
    on one machine). `mesh_shape` is the shape of an explicit `mesh=`, which wins
    over sizes left at their defaults. Also checks an int `reshard_after_forward`
    against the shard group it reshards within.
    """
    if not is_int(world_size) or world_size < 1:
        raise invalid("world_size", world_size, "an int >= 1")
    if mesh_shape is not None:
        plan = _from_mesh(config, tuple(mesh_shape))
    else:
        plan = _from_sizes(config, world_size, local_world_size or world_size)
    _check_reshard(config.reshard_after_forward, plan, world_size)
    return plan


def _from_sizes(config, world: int, local: int) -> MeshPlan:
    R, S, T = config.dp_replicate_size, config.dp_shard_size, config.tp_size
    strategy = config.sharding_strategy if config.fsdp_version == 1 else None
    replicas = f"dp_replicate_size={R}"
    note = None
    if strategy in HYBRID and R == 1:  # FSDP1 replicates across nodes [Note: mesh sizes]
        if world % local:
            raise ValueError(
                f"sharding_strategy={strategy!r} replicates across nodes, but world size {world} is not a whole "
                f"number of nodes of LOCAL_WORLD_SIZE={local}; set dp_replicate_size to the number of replicas"
            )
        R = world // local
        replicas = f"{R} node{'s' * (R != 1)} (FSDP1's replicas: world {world} / LOCAL_WORLD_SIZE {local})"
        if R == 1 and S in (None, world):
            divisors = [d for d in range(2, world) if world % d == 0]
            fix = f"set dp_replicate_size to one of {divisors}" if divisors else "launch 4 ranks, dp_replicate_size=2"
            note = (
                f"sharding_strategy={strategy!r} replicates across nodes, and this session is one machine "
                f"(world {world} / LOCAL_WORLD_SIZE {local} = 1 node, so R = 1): it runs as {HYBRID[strategy]}; "
                f"to replicate across groups of ranks here, {fix}"
            )
            strategy = HYBRID[strategy]
    shard = _resolved_shard(R, S, T, world, replicas)
    if R > 1 and shard == 1:
        raise ValueError(
            f"dp_shard_size=1 with dp_replicate_size={R} shards nothing: that is plain data parallelism "
            f"(DDP, or FSDP1's NO_SHARD); accepted: dp_shard_size >= 2, so that dp_replicate_size × dp_shard_size "
            f"× tp_size = {world}"
        )
    hybrid = strategy in HYBRID or (strategy is None and R > 1)
    return MeshPlan(shape=(R, shard) if hybrid else (shard,), tp=T, strategy=strategy, note=note)


def _resolved_shard(R: int, S: int | None, T: int, world: int, replicas: str) -> int:
    """S, or W / (R·T) for None; a product other than the world size is one line saying what would work."""
    if S is None and world % (R * T) == 0:
        return world // (R * T)
    if S is not None and R * S * T == world:
        return S
    shown = f"{replicas} × " + (f"dp_shard_size={S} × " if S is not None else "") + f"tp_size={T}"
    product = R * (S or 1) * T
    fixes = []
    if S is not None and world % (S * T) == 0 and world > S * T:  # keep the shard group, replicate it
        fixes.append(f"dp_replicate_size={world // (S * T)}")
    if world % (R * T) == 0:
        fixes.append(f"dp_shard_size={world // (R * T)} (or None: world / (dp_replicate_size × tp_size))")
    if not fixes:
        d = next((d for d in range(2, world) if world % d == 0), 1)
        fixes.append(f"sizes whose product is {world}, such as dp_replicate_size={d}, dp_shard_size={world // d}")
    what = f"= {product}, not the world size {world}" if S is not None else f"= {product} does not divide {world}"
    raise ValueError(f"{shown} {what}; use {' or '.join(fixes)}")


def _from_mesh(config, shape: tuple[int, ...]) -> MeshPlan:
    """A given mesh wins over sizes at their defaults; one the config contradicts is an error."""
    if len(shape) not in (1, 2):
        raise ValueError(
            f"mesh= has {len(shape)} dimensions {shape}; accepted: a 1-D mesh (FSDP) or a 2-D (replicate, shard) "
            "mesh (HSDP); pass its data-parallel part, such as mesh['dp_replicate', 'dp_shard']"
        )
    R, S = shape if len(shape) == 2 else (1, shape[0])
    wrong = [f"dp_replicate_size={config.dp_replicate_size}"] if config.dp_replicate_size not in (1, R) else []
    if config.dp_shard_size not in (None, S):
        wrong.append(f"dp_shard_size={config.dp_shard_size}")
    if wrong:
        raise ValueError(
            f"mesh= has shape {shape} (dp_replicate {R} × dp_shard {S}) but the config sets {', '.join(wrong)}; "
            f"leave the sizes at their defaults (the mesh wins) or make them dp_replicate_size={R}, dp_shard_size={S}"
        )
    strategy = config.sharding_strategy if config.fsdp_version == 1 else None
    if strategy is not None and (strategy in HYBRID) != (len(shape) == 2):
        if len(shape) == 2:
            raise ValueError(
                f"mesh= is 2-D {shape}, which FSDP1 shards over only with a hybrid strategy, but sharding_strategy="
                f"{strategy!r}; use sharding_strategy='HYBRID_SHARD' or 'HYBRID_SHARD_ZERO2', or a 1-D mesh"
            )
        raise ValueError(
            f"sharding_strategy={strategy!r} needs a 2-D (replicate, shard) mesh=, got shape {shape}; "
            "pass init_device_mesh(device, (R, S)), or leave mesh= out and set dp_replicate_size"
        )
    return MeshPlan(shape=shape, tp=config.tp_size, strategy=strategy)


def _check_reshard(n: Any, plan: MeshPlan, world: int) -> None:
    """An int `reshard_after_forward` reshards within a shard group: a divisor of its size, strictly between."""
    if not is_int(n):
        return
    size = plan.shard
    group = f"world size {size}" if size == world else f"the shard group size {size} (dp_shard_size)"
    divisors = [d for d in range(2, size) if size % d == 0]
    if n not in divisors:
        problem = "does not divide" if size % n else "is not smaller than"
        use = (
            f"True, False or a divisor of {size} in {divisors}"
            if divisors
            else f"True or False ({size} has no divisor strictly between 1 and {size})"
        )
        raise ValueError(f"reshard_after_forward={n} {problem} {group}; use {use}")
