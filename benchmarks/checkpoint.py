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
- load of both checkpoints;
- what integrity costs, in the same round: the SHA-256 of every file at save
  (rank 0 hashes the files while the other ranks wait) and its verification at
  load (every rank hashes its share of the files). Each is timed inside the real
  operation (`store.checksums` / `store.damaged` wrapped in a clock) and set
  against the same operation without it (the save with the hashing patched out,
  the load with `verify=False`), the two run in alternating order across rounds.
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
from fsdp_nb.checkpoint import store
root = {root!r}
out = {{}}
hashing, verifying = store.checksums, store.damaged

def patched(name, fn, replacement):  # run fn with store.<name> replaced, then put it back
    def run():
        original = getattr(store, name)
        setattr(store, name, replacement)
        try:
            fn()
        finally:
            setattr(store, name, original)
    return run

def clocked(key, original):  # original, adding the seconds it takes to out[key]: the integrity work itself
    def run(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            out[key] = out.get(key, 0.0) + time.perf_counter() - t0
    return run

def pair(name, fn, without, fn_without):
    # Both orders across rounds: the first of two back-to-back saves also pays for the other's writeback.
    runs = [(name, fn), (f"{{name}}, {{without}}", fn_without)]
    for key, run in (runs if {flip} else runs[::-1]):
        out[key] = timed(run)

def durable_save():  # what a checkpoint must do too: the bytes reach the disk before it counts as written
    with open(f"{{root}}/synced-{{rank}}.pt", "wb") as f:
        torch.save(local, f)
        f.flush()
        os.fsync(f.fileno())
out["torch.save"] = timed(lambda: torch.save(local, f"{{root}}/plain-{{rank}}.pt"))
out["torch.save + fsync"] = timed(durable_save)
for kind, state_dict_type in (("sharded", "SHARDED_STATE_DICT"), ("full", "FULL_STATE_DICT")):
    save = lambda: save_checkpoint(model, opt, f"{{root}}/{{kind}}", state_dict_type=state_dict_type)
    pair(f"{{kind}} save", patched("checksums", save, clocked(f"{{kind}} save: hashing", hashing)),
         "no checksums", patched("checksums", save, lambda directory, names, threads=None: {{}}))
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
for kind in ("sharded", "full"):
    load = lambda verify: load_checkpoint(m2, o2, f"{{root}}/{{kind}}", verify=verify)
    pair(f"{{kind}} load", patched("damaged", lambda: load(True), clocked(f"{{kind}} load: verifying", verifying)),
         "no verify", lambda: load(False))
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
        rounds = [
            s.run(ROUND.format(root=root, flip=i % 2), output=Silent()).raise_errors().values[0]
            for i in range(args.repeats)
        ]
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    base = med["torch.save"]
    for name, seconds in med.items():
        if name.endswith((": hashing", ": verifying")):
            continue
        ratio = f"{seconds / base:5.2f}x torch.save" if name != "torch.save" else "baseline"
        print(f"  {name:<28} {seconds * 1e3:8.1f} ms   {ratio}")
    print(
        f"  async: training blocked {med['async: blocked'] / med['sharded save']:.0%} of a synchronous save "
        f"(goal <= 20%)"
    )
    print("integrity (rank 0): the hashing inside the operation, and the operation against itself without it")
    for what, plain, work in (("save", "no checksums", "hashing"), ("load", "no verify", "verifying")):
        for kind in ("sharded", "full"):
            with_it, without, inside = f"{kind} {what}", f"{kind} {what}, {plain}", f"{kind} {what}: {work}"
            each = "  ".join(f"{r[with_it] / r[without]:.2f}" for r in rounds)
            print(
                f"  {kind + ' ' + what:<13} {work} {med[inside] * 1e3:6.1f} ms = {med[inside] / med[without]:4.0%} "
                f"of the {what} without it;  with / without: {med[with_it] / med[without]:4.2f}x (rounds: {each})"
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
