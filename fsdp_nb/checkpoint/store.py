"""A checkpoint on disk: one directory, published whole or not at all.

    step-000012/
      fsdp_nb_checkpoint.json   the manifest: written last, so its presence means "complete"
      .metadata  __0_0.distcp  __1_0.distcp ...   SHARDED_STATE_DICT: one file per rank (DCP)
      full.pt                                      FULL_STATE_DICT: one file, written by rank 0

[Note: atomic publication]
Every rank writes into `.step-000012.tmp-<token>` beside the final path. When all
ranks have finished, rank 0 writes the manifest (itself through a temporary name),
then renames the directory into place. A save cut off at any point (a killed
rank, a full disk) leaves at most a `.tmp-` directory, which `inspect` reports as
incomplete and never loads. Replacing an existing checkpoint renames the old one
aside first and deletes it only once the new one stands in its place.

Pure filesystem code: no torch, no process group.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "fsdp_nb_checkpoint.json"
FORMAT = "fsdp_nb.checkpoint"
FULL_FILE = "full.pt"
_TMP, _OLD = ".tmp-", ".old-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or loaded; the one-line message names the path and the problem."""


@dataclass(frozen=True)
class Manifest:
    """What a checkpoint holds, read from its manifest."""

    path: Path
    state_dict_type: str  # "SHARDED_STATE_DICT" | "FULL_STATE_DICT"
    model: dict[str, tuple[int, ...]]  # parameter and buffer names -> global shapes
    has_optimizer: bool
    saved_by: dict  # fsdp_version, world_size, torch
    extra: dict  # what the caller stored beside the state (the Trainer: its step and history)


def token() -> str:
    """A fresh name part for temporary directories (rank 0 draws it and shares it)."""
    return uuid.uuid4().hex[:12]


def temporary_dir(path: Path, tok: str) -> Path:
    return path.parent / f".{path.name}{_TMP}{tok}"


def write_manifest(directory: Path, *, state_dict_type: str, model: dict, has_optimizer: bool, saved_by: dict,
                   extra: dict) -> None:  # fmt: skip
    """Record what was saved and the size of every file beside it; written last, through a temporary name."""
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    body = {
        "format": FORMAT,
        "version": 1,
        "state_dict_type": state_dict_type,
        "model": {k: list(v) for k, v in model.items()},
        "has_optimizer": has_optimizer,
        "saved_by": saved_by,
        "extra": extra,
        "files": files,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp = directory / f".{MANIFEST}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(body, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(directory / MANIFEST)


def publish(tmp: Path, path: Path) -> None:
    """Move a finished temporary directory to `path` [Note: atomic publication]."""
    old = None
    if path.exists():
        old = path.parent / f".{path.name}{_OLD}{token()}"
        path.rename(old)  # the older checkpoint stays whole until the new one stands in its place
    tmp.rename(path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def _read(directory: Path) -> dict | None:
    try:
        with open(directory / MANIFEST, encoding="utf-8") as f:
            body = json.load(f)
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) and body.get("format") == FORMAT else None


def is_checkpoint(directory: Path) -> bool:
    return directory.is_dir() and _read(directory) is not None


def checkpoints_in(directory: Path) -> list[Path]:
    """Complete checkpoints directly inside `directory`, in name order (step-000006 before step-000012)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if not p.name.startswith(".") and is_checkpoint(p))


def _leftovers(path: Path) -> list[Path]:
    """Temporary directories a cut-off save of `path` left behind."""
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{path.name}{_TMP}*"))


def inspect(path: str | os.PathLike) -> Manifest:
    """The manifest of the complete checkpoint at `path`, or a CheckpointError that says what is wrong."""
    path = Path(path)
    if path.is_dir() and _TMP in path.name:
        raise CheckpointError(f"{path} is incomplete: a save that was cut off before every rank finished")
    if not path.exists():
        replaced = sorted(path.parent.glob(f".{path.name}{_OLD}*")) if path.parent.is_dir() else []
        if replaced:  # a save stopped between its two renames: the older checkpoint is whole, under this name
            raise CheckpointError(
                f"no checkpoint at {path}: a save that was replacing it stopped halfway; the previous "
                f"checkpoint is intact at {replaced[0]} (rename it back to {path.name})"
            )
        leftovers = _leftovers(path)
        if leftovers:
            raise CheckpointError(
                f"checkpoint {path} is incomplete: its save was cut off before every rank finished "
                f"({leftovers[0].name} holds the partial files); load an older checkpoint"
            )
        raise CheckpointError(f"no checkpoint at {path}: the path does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint: expected a directory written by save_checkpoint")
    body = _read(path)
    if body is None:
        inside = checkpoints_in(path)
        if inside:
            names = ", ".join(p.name for p in inside)
            raise CheckpointError(f"{path} is not a checkpoint but holds {len(inside)}: {names}; pass one of them")
        if any(p.suffix == ".distcp" or p.name in (".metadata", FULL_FILE) for p in path.iterdir()):
            raise CheckpointError(
                f"checkpoint {path} is incomplete: it has no {MANIFEST}, which a finished save writes last"
            )
        raise CheckpointError(f"{path} is not a checkpoint: it has no {MANIFEST}")
    for name, size in body.get("files", {}).items():
        actual = (path / name).stat().st_size if (path / name).is_file() else None
        if actual != size:
            found = "missing" if actual is None else f"{actual} bytes, not {size}"
            raise CheckpointError(f"checkpoint {path} is incomplete or damaged: {name} is {found}")
    return Manifest(
        path=path,
        state_dict_type=body["state_dict_type"],
        model={k: tuple(v) for k, v in body["model"].items()},
        has_optimizer=bool(body["has_optimizer"]),
        saved_by=body.get("saved_by", {}),
        extra=body.get("extra", {}),
    )


def latest(directory: str | os.PathLike) -> Path | None:
    """The last complete checkpoint in `directory` (by name), or `directory` itself if it is one."""
    directory = Path(directory)
    if is_checkpoint(directory):
        return directory
    found = checkpoints_in(directory)
    return found[-1] if found else None
