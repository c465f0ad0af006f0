"""The device mesh `shard()` shards over: the plan of `fsdp_nb.parallelism`, built with torch.

Two steps, because they fail differently:
1. `plan_for` is local and the same on every rank (sizes, the world, an explicit
   mesh's shape): `shard()` runs it where the ranks settle their outcome together.
2. `build_mesh` is a collective for a 2-D mesh (torch makes one process group per
   row and per column), so every rank enters it, or none does.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from fsdp_nb.parallelism import MESH_DIM_NAMES, MeshPlan, plan_mesh

if TYPE_CHECKING:
    from fsdp_nb.config import FSDPConfig


def local_world_size() -> int:
    """Ranks on this node: LOCAL_WORLD_SIZE (torchrun and a Session set it), else the whole world."""
    text = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else dist.get_world_size()


def plan_for(config: FSDPConfig, mesh: Any = None) -> MeshPlan:
    """The mesh plan on this process group: every refusal is one ValueError line."""
    if mesh is not None and config.tp_size > 1:
        raise ValueError(
            f"mesh= with tp_size={config.tp_size}: fsdp_nb builds the (dp, tp) mesh itself from the sizes; "
            "leave mesh= out and set dp_replicate_size, dp_shard_size and tp_size"
        )
    shape = tuple(mesh.shape) if mesh is not None else None
    return plan_mesh(config, dist.get_world_size(), local_world_size=local_world_size(), mesh_shape=shape)


def build_mesh(plan: MeshPlan, device_type: str, given: Any = None) -> Any:
    """The DeviceMesh to shard over: `given` as it is, else one of `plan.shape`; None where FSDP1 needs none.

    FSDP1's non-hybrid strategies shard over the default process group, as they
    always have here (a mesh would turn its sharded state dicts into DTensors).
    With tp > 1 the mesh gets a last "tp" dim; `data_parallel_mesh` is its FSDP part.
    A 2-D mesh is row-major: rank = r·S + s, so a shard group is S consecutive
    ranks (one node under torchrun) [Note: mesh sizes].
    """
    from torch.distributed.device_mesh import init_device_mesh

    if given is not None:
        return given
    if plan.tp > 1:  # (S, T) or (R, S, T), tp last: a TP group is T consecutive ranks [Note: TP ranks]
        names = (MESH_DIM_NAMES if len(plan.shape) == 2 else MESH_DIM_NAMES[1:]) + ("tp",)
        return init_device_mesh(device_type, (*plan.shape, plan.tp), mesh_dim_names=names)
    if len(plan.shape) == 1:
        return None if plan.strategy is not None else init_device_mesh(device_type, plan.shape)
    return init_device_mesh(device_type, plan.shape, mesh_dim_names=MESH_DIM_NAMES)  # (R, S)


def data_parallel_mesh(mesh: Any) -> Any:
    """The dims of `mesh` that FSDP shards over: all but "tp" (the mesh itself when it has none)."""
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if "tp" not in names:
        return mesh
    dp = tuple(n for n in names if n != "tp")
    return mesh[dp if len(dp) > 1 else dp[0]]


def tp_mesh(mesh: Any) -> Any:
    """The "tp" dim of `mesh`, or None."""
    return mesh["tp"] if "tp" in (getattr(mesh, "mesh_dim_names", None) or ()) else None


def fsdp1_group_args(plan: MeshPlan, mesh: Any) -> dict[str, Any]:
    """FSDP1's keyword for where to shard: `device_mesh` (2-D, hybrid), `process_group` (a 1-D mesh), or none."""
    if mesh is None:
        return {}
    if len(plan.shape) == 2:
        return {"device_mesh": mesh}  # rows shard (mesh dim 1), columns replicate (mesh dim 0)
    return {"process_group": mesh.get_group(0)}
