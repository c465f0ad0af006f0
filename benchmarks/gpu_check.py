"""The CUDA paths on one GPU, in one table: training in bf16 with FSDP1 and FSDP2, and checkpoints.

    python3 benchmarks/gpu_check.py [--device cuda] [--steps 20] [--layers 8] [--width 1024]

Run by benchmarks/gpu_check.sh on a lent GPU machine. Each row trains the same GPT
through a one-rank session (`Session(1, device="cuda")`, nccl), so the session,
`shard()`, the Trainer and the checkpoints all take their CUDA paths:
- step time (median of the measured steps) and `torch.cuda.max_memory_allocated`;
- a sharded save and an async save (the time training is blocked, and the GPU memory
  the snapshot added, which should be none: snapshots live in CPU memory);
- the checkpoint loaded back into a fresh model, compared for equality.
`--device cpu` runs the same script on the CPU (gloo), to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import textwrap

from fsdp_nb import Session
from fsdp_nb.session.output import Silent

RANK_CODE = """
import statistics, time, warnings
warnings.filterwarnings("ignore")
import torch
from fsdp_nb import FSDPConfig, Trainer, TrainConfig
from fsdp_nb.checkpoint import load_checkpoint, save_checkpoint
from fsdp_nb.data import ByteBlocks, stdlib_corpus
from fsdp_nb.models import GPT, GPTConfig
cuda = device.type == "cuda"

def sync():
    if cuda:
        torch.cuda.synchronize()

def allocated():
    return torch.cuda.memory_allocated() if cuda else 0

def run_case(version, steps, layers, width, folder):
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    gpt = GPTConfig(n_layer=layers, n_embd=width, n_head=max(1, width // 64), block_size=256)
    config = FSDPConfig(fsdp_version=version, auto_wrap_policy="TRANSFORMER_BASED_WRAP", mixed_precision="bf16")
    data = ByteBlocks(stdlib_corpus(400_000), gpt.block_size)
    model = GPT(gpt, seed=0)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    trainer = Trainer(model, data, TrainConfig(steps=steps + 3, global_batch_size=8, log_interval=0), fsdp=config)
    history = trainer.fit()
    row = dict(case=f"FSDP{version} bf16", params_m=params_m,
               step_ms=1e3 * statistics.median(h["step_time_s"] for h in history[3:]),
               max_mem_mib=torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan"),
               loss=history[-1]["loss"])
    sync()
    t0 = time.perf_counter()
    save_checkpoint(trainer.model, trainer.optimizer, f"{folder}/sharded{version}")
    row["save_s"] = time.perf_counter() - t0
    before = allocated()
    t0 = time.perf_counter()
    pending = save_checkpoint(trainer.model, trainer.optimizer, f"{folder}/async{version}", async_save=True)
    row["async_block_ms"] = 1e3 * (time.perf_counter() - t0)
    row["async_gpu_mib"] = (allocated() - before) / 2**20
    pending.wait()
    fresh = Trainer(GPT(gpt, seed=1), data, TrainConfig(steps=1, global_batch_size=8, log_interval=0), fsdp=config)
    load_checkpoint(fresh.model, fresh.optimizer, f"{folder}/async{version}")
    same = all(torch.equal(a.full_tensor() if hasattr(a, "full_tensor") else a,
                           b.full_tensor() if hasattr(b, "full_tensor") else b)
               for a, b in zip(trainer.model.state_dict().values(), fresh.model.state_dict().values()))
    row["reload_equal"] = same
    return row
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=1024)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as folder, Session(1, device=args.device) as s:
        s.run(textwrap.dedent(RANK_CODE), output=Silent()).raise_errors()
        for version in (1, 2):
            call = f"row = run_case({version}, {args.steps}, {args.layers}, {args.width}, {folder!r})"
            s.run(call, output=Silent()).raise_errors()
            rows.append(s.eval("row")[0])
    print(f"device: {args.device}, {args.layers} layers, width {args.width}, global batch 8 x 256 tokens")
    head = ("case", "params_m", "step_ms", "max_mem_mib", "loss", "save_s", "async_block_ms", "async_gpu_mib")
    print(" | ".join(head) + " | reload_equal")
    for row in rows:
        cells = [row["case"]] + [f"{row[k]:.3g}" for k in head[1:]] + [str(row["reload_equal"])]
        print(" | ".join(cells))
    print(json.dumps(rows))
    return 0 if all(r["reload_equal"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
