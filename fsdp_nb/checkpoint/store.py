"""A checkpoint on disk: one directory, published whole or not at all.

    step-000012/
      fsdp_nb_checkpoint.json   the manifest: written last, so its presence means "complete"
      .metadata  __0_0.distcp  __1_0.distcp ...   SHARDED_STATE_DICT: one file per rank (DCP)
      full.pt                                      FULL_STATE_DICT: one file, written by rank 0
      tokenizer/                                   save_checkpoint(..., tokenizer=): its save_pretrained files

[Note: atomic publication]
Every rank writes into `.step-000012.tmp-<token>` beside the final path. When all
ranks have finished, rank 0 writes the manifest (itself through a temporary name),
then renames the directory into place. A save cut off at any point (a killed
rank, a full disk) leaves at most a `.tmp-` directory, which `inspect` reports as
incomplete and never loads. Replacing an existing checkpoint renames the old one
aside first and deletes it only once the new one stands in its place.

A rename lives in the parent directory's entries, which the kernel may hold in
memory for seconds: after a power cut the new name can be gone although every
file was synced. So the temporary directory is synced before the rename (the
names of its files), and the parent after each rename.

[Note: checksums]
The manifest records each file's size and its SHA-256. Sizes catch a truncated
file at no cost (`inspect`); the checksum catches damaged bytes (`verify`, and
`load_checkpoint` and `merge_weights` by default). Why SHA-256: hashlib runs it
on the CPU's SHA instructions (x86 since about 2017, ARMv8), where it hashed twice
as fast as blake2b on the development machine; sha1 was no faster and is broken,
crc32 faster but 32 bits wide; and `sha256sum` checks a file by hand. Files are
read in 1 MiB chunks, never whole, and hashed by several threads (hashlib lets go
of the GIL). A manifest from before checksums has sizes only: it loads, by size.

Pure filesystem code: no torch, no process group.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = "fsdp_nb_checkpoint.json"
FORMAT = "fsdp_nb.checkpoint"
FULL_FILE = "full.pt"
TOKENIZER_DIR = "tokenizer"  # a tokenizer's save_pretrained files, checksummed and published with the rest
_TMP, _OLD = ".tmp-", ".old-"
_CHUNK = 1 << 20  # bytes per read while hashing: large enough to amortise the call, small enough to stay cached


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
    files: dict[str, int] = field(default_factory=dict)  # file name -> size in bytes
    sha256: dict[str, str] = field(default_factory=dict)  # file name -> hex digest; empty in older manifests
    # A Transformers model's "config" (its config.json as a dict), "generation_config", and for a PEFT model
    # "peft" (adapter name -> its PEFT config) and "peft_active"; None for other models and older manifests.
    hf: dict | None = None


def token() -> str:
    """A fresh name part for temporary directories (rank 0 draws it and shares it)."""
    return uuid.uuid4().hex[:12]


def temporary_dir(path: Path, tok: str) -> Path:
    return path.parent / f".{path.name}{_TMP}{tok}"


def write_manifest(directory: Path, *, state_dict_type: str, model: dict, has_optimizer: bool, saved_by: dict,
                   extra: dict, hf: dict | None = None) -> None:  # fmt: skip
    """Record what was saved, with every file's size and checksum; written last, through a temporary name.

    Files in subdirectories (the tokenizer's) are named by their path relative to `directory`."""
    files = {name: (directory / name).stat().st_size for name in _files_in(directory) if name != MANIFEST}
    body = {
        "format": FORMAT,
        "version": 1,
        "state_dict_type": state_dict_type,
        "model": {k: list(v) for k, v in model.items()},
        "has_optimizer": has_optimizer,
        "saved_by": saved_by,
        "extra": extra,
        **({"hf": hf} if hf is not None else {}),  # absent, as before this field existed, for other models
        "files": files,
        "sha256": checksums(directory, list(files)),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp = directory / f".{MANIFEST}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(body, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(directory / MANIFEST)


def _files_in(directory: Path) -> list[str]:
    """Every file under `directory` as a relative POSIX path, in name order (top-level names stay bare)."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def sync_tree(directory: Path) -> None:
    """fsync every file under `directory` and the directories that name them: for files written by code
    that does not sync (a tokenizer's `save_pretrained`), before the manifest vouches for them."""
    for name in _files_in(directory):
        with open(directory / name, "rb") as f:
            os.fsync(f.fileno())
    for sub in sorted({(directory / name).parent for name in _files_in(directory)} | {directory}):
        sync_dir(sub)


def publish(tmp: Path, path: Path) -> None:
    """Move a finished temporary directory to `path`, durably [Note: atomic publication]."""
    sync_dir(tmp)  # its files' names, the manifest's included, reach the disk before the name that vouches for them
    old = None
    if path.exists():
        old = path.parent / f".{path.name}{_OLD}{token()}"
        path.rename(old)  # the older checkpoint stays whole until the new one stands in its place
        sync_dir(path.parent)
    tmp.rename(path)
    sync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sync_dir(directory: Path) -> None:
    """fsync a directory, so that the names created or renamed in it survive a power cut (about a millisecond)."""
    if os.name == "nt":  # Windows cannot open a directory as a file; NTFS journals renames itself
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: a file system that cannot sync directories (some network mounts)
            raise
    finally:
        os.close(fd)


def checksum(file: Path) -> str:
    """The SHA-256 of a file as hex, read in chunks [Note: checksums]."""
    digest, buffer = hashlib.sha256(), bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(file, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])  # hashlib releases the GIL here: threads hash files in parallel
    return digest.hexdigest()


def checksums(directory: Path, names: list[str], threads: int | None = None) -> dict[str, str]:
    """`{name: sha256}` of files in `directory`, hashed by up to `threads` threads (default: one per CPU)."""
    threads = max(1, min(len(names), threads or os.cpu_count() or 1))
    with ThreadPoolExecutor(threads) as pool:
        return dict(zip(names, pool.map(lambda name: checksum(directory / name), names)))


def damaged(manifest: Manifest, names: list[str] | None = None, threads: int | None = None) -> str | None:
    """Why `names` (default: every file with a recorded checksum) differ from the manifest, in one line; or None.

    Never raises for a file that cannot be read: it becomes the answer, so that ranks
    which verify files in parallel can all raise the same error together.
    """
    names = sorted(manifest.sha256) if names is None else names
    try:
        found = checksums(manifest.path, names, threads)
    except OSError as e:
        return f"checkpoint {manifest.path} cannot be verified: {e.strerror or e}: {Path(e.filename or '').name}"
    for name in names:
        if found[name] != manifest.sha256[name]:
            return (
                f"checkpoint {manifest.path} is damaged: {name} does not match the checksum its save recorded "
                f"(sha256 {found[name][:12]}..., expected {manifest.sha256[name][:12]}...); load an older checkpoint"
            )
    return None


def verify(path: str | os.PathLike) -> Manifest:
    """Check that the checkpoint at `path` is complete and every byte is as saved; returns its manifest.

    Raises CheckpointError, naming the file, for a missing, truncated or damaged one.
    A checkpoint saved before checksums were recorded is checked by size only
    (`Manifest.sha256` is empty then).
    """
    manifest = inspect(path)
    problem = damaged(manifest)
    if problem:
        raise CheckpointError(problem)
    return manifest


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
    try:
        manifest = Manifest(
            path=path,
            state_dict_type=body["state_dict_type"],
            model={k: tuple(v) for k, v in body["model"].items()},
            has_optimizer=bool(body["has_optimizer"]),
            saved_by=body.get("saved_by", {}),
            extra=body.get("extra", {}),
            files={str(k): int(v) for k, v in body.get("files", {}).items()},
            sha256={str(k): str(v) for k, v in body.get("sha256", {}).items()},
            hf=dict(body["hf"]) if body.get("hf") is not None else None,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {path} has a damaged {MANIFEST} ({type(e).__name__}: {e}); "
                              "load an older checkpoint") from None  # fmt: skip
    for name, size in manifest.files.items():
        actual = (path / name).stat().st_size if (path / name).is_file() else None
        if actual != size:
            found = "missing" if actual is None else f"{actual} bytes, not {size}"
            raise CheckpointError(f"checkpoint {path} is incomplete or damaged: {name} is {found}")
    return manifest


def latest(directory: str | os.PathLike) -> Path | None:
    """The last complete checkpoint in `directory` (by name), or `directory` itself if it is one."""
    directory = Path(directory)
    if is_checkpoint(directory):
        return directory
    found = checkpoints_in(directory)
    return found[-1] if found else None
