"""`merge_weights`: a checkpoint's model weights as one file that a plain, unsharded model loads.

Runs in this process alone, with no process group, even on one rank of a live job
(`if rank == 0: merge_weights(...)` in a `%%fsdp` cell): nothing here waits on
another rank. Only the model is read, never the optimizer state (twice the model
again with AdamW), so the memory needed is about one copy of the weights:
- a sharded checkpoint: empty tensors of each weight's global shape and dtype,
  taken from DCP's metadata, are filled by DCP's `load(..., no_dist=True)`, which
  reads every shard of only those keys from whichever files hold them;
- a full checkpoint: `full.pt` is memory-mapped, and only the pages of the model's
  tensors are read, by the writer itself, as it writes them out.

A checkpoint of a Transformers model (its manifest's `hf` record, see `fsdp_nb.hf.export`)
becomes a whole `from_pretrained` directory: `config.json`, `generation_config.json`,
the weights under the base architecture's names (a PEFT model's adapters folded in), and
the tokenizer's files when the checkpoint has them. Every file is written under a
temporary name and renamed into place, `config.json` last.
"""

from __future__ import annotations

import inspect
import os
import shutil
import warnings
from pathlib import Path

import torch

from fsdp_nb.checkpoint import store
from fsdp_nb.checkpoint.load import first_line
from fsdp_nb.checkpoint.store import CheckpointError
from fsdp_nb.hf import export

SAFE_NAME, TORCH_NAME = "model.safetensors", "pytorch_model.bin"  # Accelerate's file names
# What DCP says each time it is asked to load without ranks; here that is the intent, not a misconfiguration.
_NO_DIST_NOTICE = "torch.distributed is (disabled, )?unavailable or uninitialized"


def merge_weights(checkpoint_dir: str | os.PathLike, output_path: str | os.PathLike, *,
                  safe_serialization: bool = True, verify: bool = True) -> Path:  # fmt: skip
    """Write the model weights of `checkpoint_dir` to `output_path/model.safetensors`.

    With `safe_serialization=False` the file is `output_path/pytorch_model.bin`, a
    `torch.save`d state dict. Either loads with `model.load_state_dict(...)` into the
    plain model. Returns the file written. A checkpoint of a Transformers model becomes
    a directory that `AutoModelForCausalLM.from_pretrained(output_path)` loads (a PEFT
    model's adapters folded into the base weights, as `merge_and_unload` does, and the
    tokenizer's files beside them if the checkpoint has a tokenizer); then the directory
    is returned. Raises CheckpointError (one line) for a missing path, a directory that
    is not a checkpoint, one that holds several, or (unless `verify=False`) a file whose
    bytes differ from those saved.
    """
    manifest = store.verify(checkpoint_dir) if verify else store.inspect(checkpoint_dir)
    out_dir = Path(output_path)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"output path {out_dir} is a file; give a directory to write {SAFE_NAME} into")
    weights = _read_model(manifest)
    out_dir.mkdir(parents=True, exist_ok=True)
    if manifest.hf is not None:
        return _write_pretrained(manifest, weights, out_dir, safe_serialization)
    target = out_dir / (SAFE_NAME if safe_serialization else TORCH_NAME)
    tmp = target.with_name(f".{target.name}.tmp")
    _save_weights(weights, tmp, safe_serialization)
    tmp.replace(target)
    if _tokenizer_files(manifest):  # a tokenizer saved beside a model that is not a Transformers model
        tmp_dir = export.temporary_dir(out_dir)
        _copy_tokenizer(manifest, tmp_dir)
        export.publish_files(tmp_dir, out_dir, last="")
    return target


def _save_weights(weights: dict[str, torch.Tensor], file: Path, safe: bool) -> None:
    if safe:
        from safetensors.torch import save_file

        save_file(_unshared(weights), str(file), metadata={"format": "pt"})
    else:
        torch.save(weights, file)


def _write_pretrained(manifest: store.Manifest, weights: dict[str, torch.Tensor], out_dir: Path,
                      safe: bool) -> Path:  # fmt: skip
    """A `from_pretrained` directory: everything written into a temporary directory inside `out_dir`,
    then renamed into place file by file, `config.json` last."""
    tmp = export.temporary_dir(out_dir)
    try:
        try:
            state = export.pretrained_state(weights, manifest.hf, tmp)
        except ImportError as e:
            raise CheckpointError(f"checkpoint {manifest.path} holds a Transformers model; merging it needs "
                                  f"the hf extra (pip install 'fsdp_nb[hf]'): {first_line(e)}") from None  # fmt: skip
        except (CheckpointError, KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # a config this Transformers cannot read, adapters that do not fit, ...
            raise CheckpointError(f"merging {manifest.path} into a Transformers directory failed: "
                                  f"{first_line(e)}") from None  # fmt: skip
        name = SAFE_NAME if safe else TORCH_NAME
        _save_weights(state, tmp / name, safe)
        _copy_tokenizer(manifest, tmp)
        export.publish_files(tmp, out_dir, last=export.CONFIG_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # The other format's file, from an earlier merge here: from_pretrained reads a safetensors file first.
    (out_dir / (TORCH_NAME if safe else SAFE_NAME)).unlink(missing_ok=True)
    return out_dir


def _tokenizer_files(manifest: store.Manifest) -> list[str]:
    return sorted(n for n in manifest.files if n.startswith(f"{store.TOKENIZER_DIR}/"))


def _copy_tokenizer(manifest: store.Manifest, directory: Path) -> None:
    """The tokenizer's files (verified with the rest of the checkpoint) into `directory`, beside the weights."""
    for name in _tokenizer_files(manifest):
        target = directory / name.removeprefix(f"{store.TOKENIZER_DIR}/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(manifest.path / name, target)


def _read_model(manifest: store.Manifest) -> dict[str, torch.Tensor]:
    """The model's tensors by name, in the model's own order; the optimizer's are never read."""
    try:
        if manifest.state_dict_type == "FULL_STATE_DICT":
            # mmap: the file's pages become memory only when touched; the optimizer's never are.
            full = torch.load(manifest.path / store.FULL_FILE, map_location="cpu", weights_only=True, mmap=True)
            model = full["model"]
        else:
            model = _read_sharded_model(manifest)
        return {k: model[k] for k in manifest.model}
    except (CheckpointError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        raise CheckpointError(f"reading checkpoint {manifest.path} failed: {first_line(e)}") from None


def _read_sharded_model(manifest: store.Manifest) -> dict[str, torch.Tensor]:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    no_dist = "no_dist" in inspect.signature(dcp.load).parameters  # public since torch 2.7
    if not no_dist and dist.is_initialized():  # older DCP runs collectives whenever a process group exists
        raise CheckpointError(f"merging {manifest.path} inside a distributed job needs torch >= 2.7 "
                              f"(this is {torch.__version__}); run merge_weights outside the job")  # fmt: skip
    reader = dcp.FileSystemReader(str(manifest.path))
    saved = reader.read_metadata().state_dict_metadata  # "model.<name>" -> global size and dtype
    model = {}
    for name in manifest.model:
        meta = saved.get(f"model.{name}")
        if meta is None or not hasattr(meta, "size"):
            raise CheckpointError(f"checkpoint {manifest.path} has no tensor model.{name} in its DCP metadata")
        model[name] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    state = {"model": model}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_DIST_NOTICE)
        dcp.load(state, storage_reader=reader, **({"no_dist": True} if no_dist else {}))
    return state["model"]


def _unshared(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): give each its own."""
    seen, out = set(), {}
    for key, tensor in weights.items():
        tensor = tensor.contiguous()
        ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[key] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out
