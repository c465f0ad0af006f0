"""Benchmark: step time and per-rank memory of FSDP1 and FSDP2 against one process and DDP.

    OMP_NUM_THREADS=1 python benchmarks/train.py [--steps 20] [--warmup 3] [--layers 4] [--width 128]

Every case trains the same GPT on the same global batch through `fsdp_nb.Trainer`
and reports the median step time over `--steps` steps after `--warmup` steps.
"single" is one process with one thread doing the whole global batch; the other
cases are 2 ranks (gloo, one thread each) doing half of it each. Ratios are
against the baselines measured in this same run.

Memory is what each rank holds after an optimizer step: parameters, gradients and
AdamW state, summed over local storages (`fsdp_nb.inspect.memory_of`). For the
sharded cases it is compared with full / N plus the padding torch adds: FSDP1 pads
each flat parameter to a multiple of N elements; FSDP2 pads each parameter's
dim 0 to a multiple of N rows.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import socket
import statistics
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fsdp_nb.config import FSDPConfig
from fsdp_nb.data import ByteBlocks, stdlib_corpus
from fsdp_nb.models import GPT, GPTConfig
from fsdp_nb.train import TrainConfig, Trainer

WORLD_SIZE = 2
WRAP = dict(auto_wrap_policy="TRANSFORMER_BASED_WRAP")
CASES = {  # name -> FSDPConfig fields, "ddp", or "raw" (a hand-written FSDP2 loop, no fsdp_nb)
    "ddp": "ddp",
    "fsdp1 FULL_SHARD": dict(fsdp_version=1, **WRAP),
    "fsdp1 SHARD_GRAD_OP": dict(fsdp_version=1, sharding_strategy="SHARD_GRAD_OP", **WRAP),
    "fsdp2 reshard=True": dict(fsdp_version=2, reshard_after_forward=True, **WRAP),
    "fsdp2 reshard=False": dict(fsdp_version=2, reshard_after_forward=False, **WRAP),
    "fsdp2 fwd prefetch": dict(fsdp_version=2, forward_prefetch=True, **WRAP),
    "raw torch FSDP2 loop": "raw",
}
# The targets of the comparison, each against a baseline measured in the same run.
TARGETS = (
    ("fsdp2 reshard=True", "fsdp1 FULL_SHARD", 1.05),
    ("fsdp2 reshard=False", "fsdp1 SHARD_GRAD_OP", 1.00),
    ("fsdp2 reshard=True", "raw torch FSDP2 loop", 1.02),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="measured steps (median taken), >= 15 recommended")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="global batch size")
    p.add_argument("--rounds", type=int, default=3, help="every case this many times, in alternating order")
    return p.parse_args(argv)


def model_config(args) -> GPTConfig:
    return GPTConfig(n_layer=args.layers, n_embd=args.width, n_head=4, block_size=args.block)


def time_and_memory(model, args, fsdp=None) -> dict:
    """Train warmup + steps steps; median step time of the measured ones, last step's memory."""
    data = ByteBlocks(stdlib_corpus(400_000), args.block)
    config = TrainConfig(steps=args.warmup + args.steps, global_batch_size=args.batch, lr=1e-3, log_interval=0)
    trainer = Trainer(model, data, config, fsdp=fsdp)
    history = trainer.fit()
    measured = [h["step_time_s"] for h in history[args.warmup :]]
    last = history[-1]
    return {
        "median_s": statistics.median(measured),
        "param": last["param_bytes"],
        "grad": last["grad_bytes"],
        "optim": last["optim_bytes"],
        "padding": padding_per_rank(trainer.model),
    }


def raw_fsdp2_loop(model, args) -> dict:
    """The same training as the Trainer's, written by hand against torch: what fsdp_nb must not slow down.

    Per step: this rank's rows of the global batch, forward, backward, the global
    gradient norm, a fused AdamW step, zero_grad, and the loss averaged over ranks.
    """
    import time

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fsdp_nb.data import ShardedBatches
    from fsdp_nb.models import Block

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), fused=True)
    batches = ShardedBatches(
        ByteBlocks(stdlib_corpus(400_000), args.block),
        global_batch_size=args.batch,
        rank=dist.get_rank(),
        world_size=WORLD_SIZE,
        seed=0,
    )
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        x, y = batches.batch(step, torch.device("cpu"))
        _, loss = model(x, y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        float(mean), float(norm)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times[args.warmup :]), "param": 0, "grad": 0, "optim": 0, "padding": 0}


def padding_per_rank(model) -> int:
    """Bytes of padding per rank, from torch's own sharding rules (0 when not sharded)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(model, FSDP):  # one flat parameter per unit, padded to a multiple of N
        flats = [m._handle.flat_param for m in FSDP.fsdp_modules(model) if m._handle is not None]
        return sum((f._padded_unsharded_size.numel() - sum(f._numels)) * f.element_size() for f in flats) // WORLD_SIZE
    if isinstance(model, FSDPModule):  # each parameter's dim 0 padded to a multiple of N rows
        return (
            sum(
                (math.ceil(p.shape[0] / WORLD_SIZE) * WORLD_SIZE - p.shape[0])
                * (p.numel() // p.shape[0])
                * p.element_size()
                for p in model.parameters()
            )
            // WORLD_SIZE
        )
    return 0


def rank_main(rank: int, port: int, args, queue) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    runs: dict[str, list[dict]] = {name: [] for name in CASES}
    for round_ in range(args.rounds):
        order = list(CASES) if round_ % 2 == 0 else list(reversed(CASES))  # no case always goes first
        for name in order:
            case = CASES[name]
            model = GPT(model_config(args), seed=0)
            if case == "ddp":
                runs[name].append(time_and_memory(torch.nn.parallel.DistributedDataParallel(model), args))
            elif case == "raw":
                runs[name].append(raw_fsdp2_loop(model, args))
            else:
                runs[name].append(time_and_memory(model, args, fsdp=FSDPConfig(**case)))
            del model
            gc.collect()
    results = {name: {**r[-1], "median_s": statistics.median(x["median_s"] for x in r)} for name, r in runs.items()}
    gathered = [None] * WORLD_SIZE
    dist.all_gather_object(gathered, results)  # every rank's memory, for the table
    if rank == 0:
        queue.put(gathered)
    gc.collect()  # free FSDP state (it holds finished collectives) before the group goes
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report(single: dict, per_rank: list[dict], full_bytes: int, args) -> None:
    """Print the tables (the parent process is the only one that prints)."""
    ddp = max(r["ddp"]["median_s"] for r in per_rank)  # like every row: the slowest rank
    print(
        f"GPT n_layer={args.layers} n_embd={args.width} block={args.block}, global batch {args.batch}, "
        f"{WORLD_SIZE} ranks x 1 thread, median of {args.steps} steps after {args.warmup} warm-up"
    )
    print(f"{args.rounds} rounds, alternating the order of the cases; each figure is the median over rounds")
    print(f"\n{'case':<24}{'median step':>12}{'vs single':>11}{'vs ddp':>9}")
    print(
        f"{'single (1 process)':<24}{single['median_s'] * 1e3:>9.1f} ms{1.0:>10.2f}x{single['median_s'] / ddp:>8.2f}x"
    )
    step = {name: max(r[name]["median_s"] for r in per_rank) for name in CASES}  # the slowest rank's
    for name in CASES:
        t = step[name]
        print(f"{name:<24}{t * 1e3:>9.1f} ms{t / single['median_s']:>10.2f}x{t / ddp:>8.2f}x")
    print()
    for case, baseline, target in TARGETS:
        ratio = step[case] / step[baseline]
        verdict = "met" if ratio <= target else "NOT met"
        print(f"{case} / {baseline}: {ratio:.3f}x (target <= {target:.2f}x: {verdict})")

    print(
        f"\nper-rank memory, unsharded model: params {full_bytes / 1024:.1f} KiB "
        f"(grads the same, AdamW state twice that); full / {WORLD_SIZE} = {full_bytes / WORLD_SIZE / 1024:.1f} KiB"
    )
    print(
        f"{'case':<24}{'rank':>5}{'params KiB':>12}{'grads KiB':>11}{'optim KiB':>11}"
        f"{'padding B':>11}{'params vs full/N':>18}{'minus padding':>15}"
    )
    for name in ["ddp"] + [n for n in CASES if n.startswith("fsdp")]:  # the raw loop does not report memory
        for rank, results in enumerate(per_rank):
            r = results[name]
            ideal = full_bytes / (1 if name == "ddp" else WORLD_SIZE)
            print(
                f"{name:<24}{rank:>5}{r['param'] / 1024:>12.1f}{r['grad'] / 1024:>11.1f}{r['optim'] / 1024:>11.1f}"
                f"{r['padding']:>11}{(r['param'] / ideal - 1) * 100:>+17.2f}%"
                f"{((r['param'] - r['padding']) / ideal - 1) * 100:>+14.2f}%"
            )


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    single = time_and_memory(GPT(model_config(args), seed=0), args)
    full_bytes = GPT(model_config(args)).num_params() * 4
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(rank_main, args=(free_port(), args, queue), nprocs=WORLD_SIZE, start_method="spawn")
    report(single, queue.get(), full_bytes, args)


if __name__ == "__main__":
    main()
