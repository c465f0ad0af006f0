"""Checkpoint speed at 2 ranks, and the memory `cpu_ram_efficient_loading` saves on ranks != 0.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/checkpoint.py [--width 1024] [--layers 2] [--repeats 3]

Part 1, in one 2-rank session (gloo, one thread per rank), with a GPT of about 100 MB
of fp32 weights (width 1024, 2 blocks: 25M parameters) sharded by FSDP2 and AdamW
state (3x the weights in all):
- baseline: the same bytes (this rank's shards of model and optimizer) written by
  one `torch.save` per rank, at the same time; and the same with an fsync, since a
  checkpoint's files are synced before it counts as written;
- sharded save (DCP, one file per rank) and full save (gathered to rank 0, one file);
- async save: how long training is blocked (the call, which copies the shards)
  against a synchronous save, while training steps run; goal: blocked <= 20%;
- load of the sharded checkpoint.
Each figure is the median of `--repeats` runs.

Part 2: peak resident memory (ru_maxrss) of rank 1 from building the model to a
sharded model, with `cpu_ram_efficient_loading` off and on, FSDP1 and FSDP2; one
fresh 2-rank session per measurement, since a process's peak never goes down.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")

from fsdp_nb import Session  # noqa: E402
from fsdp_nb.session.output import Silent  # noqa: E402

SETUP = """
import os, resource, shutil, time, torch
from fsdp_nb import FSDPConfig, shard, save_checkpoint, load_checkpoint
from fsdp_nb.models import GPT, GPTConfig
config = GPTConfig(block_size=64, n_layer={layers}, n_head=8, n_embd={width}, vocab_size=256)

def fresh():
    model = shard(GPT(config, seed=0), FSDPConfig(fsdp_version=2, auto_wrap_policy="TRANSFORMER_BASED_WRAP"))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)

def step(model, opt):
    x = torch.randint(0, 256, (1, 64))
    model(x, x)[1].backward()
    opt.step()
    opt.zero_grad()

model, opt = fresh()
step(model, opt)  # AdamW state exists
local = {{"model": {{k: v.to_local() for k, v in model.state_dict().items()}},
          "optim": {{i: {{k: (v.to_local() if hasattr(v, "to_local") else v) for k, v in s.items()}}
                    for i, s in enumerate(opt.state.values())}}}}
local_bytes = sum(t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(local) if torch.is_tensor(t))

def timed(fn):
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0
"""

ROUND = """
root = {root!r}
out = {{}}
def durable_save():  # what a checkpoint must do too: the bytes reach the disk before it counts as written
    with open(f"{{root}}/synced-{{rank}}.pt", "wb") as f:
        torch.save(local, f)
        f.flush()
        os.fsync(f.fileno())
out["torch.save"] = timed(lambda: torch.save(local, f"{{root}}/plain-{{rank}}.pt"))
out["torch.save + fsync"] = timed(durable_save)
out["sharded save"] = timed(lambda: save_checkpoint(model, opt, f"{{root}}/sharded"))
out["full save"] = timed(lambda: save_checkpoint(model, opt, f"{{root}}/full", state_dict_type="FULL_STATE_DICT"))
steps = []
dist.barrier()
t0 = time.perf_counter()
handle = save_checkpoint(model, opt, f"{{root}}/async", async_save=True)
blocked = time.perf_counter() - t0
while len(steps) < 3:  # the same number of steps on every rank, while the save runs
    t1 = time.perf_counter()
    step(model, opt)
    steps.append(time.perf_counter() - t1)
handle.wait()
out["async: blocked"] = blocked
out["async: until written"] = time.perf_counter() - t0
m2, o2 = fresh()
out["sharded load"] = timed(lambda: load_checkpoint(m2, o2, f"{{root}}/sharded"))
del m2, o2
out
"""

MEMORY = """
import resource, torch
from fsdp_nb import FSDPConfig, shard
from fsdp_nb.models import GPT, GPTConfig
from fsdp_nb.sharding import build_on_rank0
config = GPTConfig(block_size=64, n_layer={layers}, n_head=8, n_embd={width}, vocab_size=256)
fsdp = FSDPConfig(fsdp_version={version}, cpu_ram_efficient_loading={efficient},
                  auto_wrap_policy="TRANSFORMER_BASED_WRAP")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = shard(build_on_rank0(lambda: GPT(config, seed=0), fsdp), fsdp)
(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as root, Session(2, timeout=300) as s:
        s.run(SETUP.format(width=args.width, layers=args.layers), output=Silent()).raise_errors()
        per_rank = s.eval("local_bytes")
        print(
            f"checkpoint: {sum(per_rank) / 2**20:.0f} MiB of model and AdamW state over 2 ranks "
            f"(model {s.eval('sum(p.numel() for p in model.parameters())')[0] * 4 / 2**20:.0f} MiB)"
        )
        rounds = [s.run(ROUND.format(root=root), output=Silent()).raise_errors().values[0] for _ in range(args.repeats)]
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    base = med["torch.save"]
    for name, seconds in med.items():
        ratio = f"{seconds / base:5.2f}x torch.save" if name != "torch.save" else "baseline"
        print(f"  {name:<22} {seconds * 1e3:8.1f} ms   {ratio}")
    print(
        f"  async: training blocked {med['async: blocked'] / med['sharded save']:.0%} of a synchronous save "
        f"(goal <= 20%)"
    )

    print("peak resident memory of rank 1, from building the model to sharding it (KiB of ru_maxrss):")
    for version in (1, 2):
        row = {}
        for efficient in (False, True):
            with Session(2, timeout=300) as s:
                code = MEMORY.format(width=args.width, layers=args.layers, version=version, efficient=efficient)
                before, after = s.run(code, output=Silent()).raise_errors().values[1]
            row[efficient] = after - before
        print(
            f"  FSDP{version}: off {row[False] / 1024:7.1f} MiB   on {row[True] / 1024:7.1f} MiB   "
            f"ratio {row[True] / max(row[False], 1):.2f}"
        )


if __name__ == "__main__":
    main()
