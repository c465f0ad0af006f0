"""Run files for `fsdp-nb train --config FILE`: read the YAML, build the model and data, train.

The config file is YAML with four sections, each optional:

  model:            # GPTConfig fields; `size: debug` starts from GPTConfig.debug()
    size: debug
  data:             # source: "stdlib" or a text file; max_bytes; val_fraction
    source: stdlib
    max_bytes: 200000
    val_fraction: 0.1
  train:            # TrainConfig fields
    steps: 20
    global_batch_size: 8
  fsdp:             # FSDPConfig fields; leave out to train one unsharded process
    fsdp_version: 2
    auto_wrap_policy: TRANSFORMER_BASED_WRAP

Run it on 2 CPU ranks:
  OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m fsdp_nb.cli train --config run.yaml
"""

from __future__ import annotations

import os

import torch.distributed as dist

from fsdp_nb.data import ByteBlocks
from fsdp_nb.train import TrainConfig, Trainer


def load_run_file(path: str) -> dict:
    """Read a run file into {"model": GPTConfig, "data": dict, "train": TrainConfig, "fsdp": FSDPConfig | None}."""
    import yaml

    from fsdp_nb.config import FSDPConfig
    from fsdp_nb.models import GPTConfig

    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    unknown = sorted(set(raw) - {"model", "data", "train", "fsdp"})
    if unknown:
        raise ValueError(f"{path}: unknown sections {unknown}; accepted: model, data, train, fsdp")
    model = dict(raw.get("model") or {})
    size = model.pop("size", "default")
    if size not in ("debug", "default"):
        raise ValueError(f"{path}: model.size={size!r}; accepted: debug, default")
    data = {"source": "stdlib", "max_bytes": 1_000_000, "val_fraction": 0.1, **(raw.get("data") or {})}
    return {
        "model": GPTConfig.debug(**model) if size == "debug" else GPTConfig(**model),
        "data": data,
        "train": TrainConfig(**(raw.get("train") or {})),
        "fsdp": FSDPConfig.from_dict(raw["fsdp"]) if raw.get("fsdp") else None,
    }


def add_train_arguments(parser) -> None:
    """Add the `train` command's flags to an argparse parser."""
    parser.add_argument("--config", required=True, help="YAML run file (sections model, data, train, fsdp)")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--history", default=None, help="rank 0 writes the per-step history here as JSON")
    parser.add_argument(
        "--resume",
        default=None,
        metavar="PATH",
        help="continue from this checkpoint (or the latest in this directory of checkpoints)",
    )
    parser.add_argument("--checkpoint_dir", default=None, help="write checkpoints here (step-NNNNNN)")
    parser.add_argument("--checkpoint_every", type=int, default=0, help="steps between checkpoints (0: never)")


def cli_train(args) -> int:
    """Train the GPT described by `args.config`; returns the exit status."""
    import dataclasses
    import gc
    import json

    from fsdp_nb.data import load_corpus
    from fsdp_nb.models import GPT

    run = load_run_file(args.config)
    if run["fsdp"] is not None and "RANK" not in os.environ and not dist.is_initialized():
        raise ValueError(
            f"{args.config} has an fsdp section, which needs several ranks: run "
            f"`torchrun --standalone --nproc-per-node 2 -m fsdp_nb.cli train --config {args.config}`, "
            "or remove the fsdp section to train in one process"
        )
    config = run["train"] if args.steps is None else dataclasses.replace(run["train"], steps=args.steps)
    blocks = ByteBlocks(load_corpus(run["data"]["source"], run["data"]["max_bytes"]), run["model"].block_size)
    train_data, val_data = blocks.split(run["data"]["val_fraction"])
    trainer = Trainer(
        GPT(run["model"], seed=config.seed),
        train_data,
        config,
        fsdp=run["fsdp"],
        val_data=val_data,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        resume_from=args.resume,
    )
    history = trainer.fit()
    if args.history and trainer.master_process:
        with open(args.history, "w") as f:
            json.dump(history, f, indent=1)
    if dist.is_initialized():
        # Free FSDP's state (it holds tensors of finished collectives) while the
        # process group still exists; gloo can abort at exit otherwise.
        del trainer
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return 0
