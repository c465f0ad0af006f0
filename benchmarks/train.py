"""Benchmark: step time and per-rank memory of FSDP1 and FSDP2 against one process and DDP.

    OMP_NUM_THREADS=1 python benchmarks/train.py [--rounds 3] [--steps 10] [--warmup 3] [--layers 4] [--width 128]

Every case trains the same GPT on the same global batch through `fsdp_nb.Trainer`
(one case is a hand-written torch loop). The cases take turns one step at a time;
each round's figure is the median of its `--steps` steps per case, after
`--warmup` steps each, and each target's ratio is printed for every round, then
the median of the rounds, which is what the target is judged on.
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

from fsdp_nb._torch import flat_info, fsdp1_handles
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
    p.add_argument("--steps", type=int, default=10, help="measured steps of each case per round (median taken)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="global batch size")
    p.add_argument("--rounds", type=int, default=3, help="rounds of --steps steps, each with its own ratio")
    return p.parse_args(argv)


def model_config(args) -> GPTConfig:
    return GPTConfig(n_layer=args.layers, n_embd=args.width, n_head=4, block_size=args.block)


class TrainerCase:
    """One case trained through `fsdp_nb.Trainer`, one optimizer step at a time."""

    def __init__(self, model, args, fsdp=None):
        data = ByteBlocks(stdlib_corpus(400_000), args.block)
        steps = args.warmup + args.rounds * args.steps
        config = TrainConfig(steps=steps, global_batch_size=args.batch, lr=1e-3, log_interval=0)
        self.trainer = Trainer(model, data, config, fsdp=fsdp)
        self.last: dict = {}

    def step(self, i: int) -> float:
        self.last = self.trainer.train_step(i)
        return self.last["step_time_s"]

    def memory(self) -> dict:
        return {
            "param": self.last["param_bytes"],
            "grad": self.last["grad_bytes"],
            "optim": self.last["optim_bytes"],
            "padding": padding_per_rank(self.trainer.model),
        }


class RawFSDP2Case:
    """The same training as the Trainer's, written by hand against torch: what fsdp_nb must not slow down.

    Per step: this rank's rows of the global batch, forward, backward, the global
    gradient norm, a fused AdamW step, zero_grad, and the loss averaged over ranks.
    """

    def __init__(self, model, args):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from fsdp_nb.data import ShardedBatches
        from fsdp_nb.models import Block

        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        for module in model.modules():
            if isinstance(module, Block):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), fused=True)
        self.batches = ShardedBatches(
            ByteBlocks(stdlib_corpus(400_000), args.block),
            global_batch_size=args.batch,
            rank=dist.get_rank(),
            world_size=WORLD_SIZE,
            seed=0,
        )

    def step(self, i: int) -> float:
        import time

        start = time.perf_counter()
        x, y = self.batches.batch(i, torch.device("cpu"))
        _, loss = self.model(x, y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf")).full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        float(mean), float(norm)
        return time.perf_counter() - start

    def memory(self) -> dict:
        return {"param": 0, "grad": 0, "optim": 0, "padding": 0}


def padding_per_rank(model) -> int:
    """Bytes of padding per rank, from torch's own sharding rules (0 when not sharded)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(model, FSDP):  # one flat parameter per unit, padded to a multiple of N
        infos = [flat_info(h) for h in fsdp1_handles(model).values()]
        return (
            sum((i.local_numel * i.world_size - sum(map(math.prod, i.shapes))) * i.flat.element_size() for i in infos)
            // WORLD_SIZE
        )
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
    """Every case is built first, then they take turns one step at a time, in an order that
    alternates each step: a case never runs while the machine is warmer or busier than for the
    others (a whole case in a row made the ratios drift by 10-20% between runs)."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    cases = {}
    for name, case in CASES.items():
        model = GPT(model_config(args), seed=0)
        if case == "ddp":
            cases[name] = TrainerCase(torch.nn.parallel.DistributedDataParallel(model), args)
        elif case == "raw":
            cases[name] = RawFSDP2Case(model, args)
        else:
            cases[name] = TrainerCase(model, args, fsdp=FSDPConfig(**case))
    for i in range(args.warmup):
        for case in cases.values():
            case.step(i)
    times: dict[str, list[list[float]]] = {name: [[] for _ in range(args.rounds)] for name in CASES}
    for k in range(args.rounds * args.steps):
        order = list(CASES) if k % 2 == 0 else list(reversed(CASES))  # no case always goes first
        for name in order:
            times[name][k // args.steps].append(cases[name].step(args.warmup + k))
    results = {}
    for name, rounds in times.items():
        per_round = [statistics.median(r) for r in rounds]
        results[name] = {**cases[name].memory(), "median_s": statistics.median(per_round), "rounds_s": per_round}
    gathered = [None] * WORLD_SIZE
    dist.all_gather_object(gathered, results)  # every rank's memory, for the table
    if rank == 0:
        queue.put(gathered)
    del cases
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
        f"{WORLD_SIZE} ranks x 1 thread, {args.rounds} rounds of {args.steps} steps per case after {args.warmup} warm-up"
    )
    print("cases take turns one step at a time; each figure is the median over rounds of each round's median")
    print(f"\n{'case':<24}{'median step':>12}{'vs single':>11}{'vs ddp':>9}")
    print(
        f"{'single (1 process)':<24}{single['median_s'] * 1e3:>9.1f} ms{1.0:>10.2f}x{single['median_s'] / ddp:>8.2f}x"
    )
    step = {name: max(r[name]["median_s"] for r in per_rank) for name in CASES}  # the slowest rank's
    for name in CASES:
        t = step[name]
        print(f"{name:<24}{t * 1e3:>9.1f} ms{t / single['median_s']:>10.2f}x{t / ddp:>8.2f}x")
    print()
    # Each round's ratio (the slowest rank's step time in that round), then their median: the target
    # counts as met only when the median meets it.
    rounds = {name: [max(r[name]["rounds_s"][i] for r in per_rank) for i in range(args.rounds)] for name in CASES}
    for case, baseline, target in TARGETS:
        ratios = [a / b for a, b in zip(rounds[case], rounds[baseline])]
        median = statistics.median(ratios)
        verdict = "met" if median <= target else "NOT met"
        each = ", ".join(f"{r:.3f}x" for r in ratios)
        print(f"{case} / {baseline}: rounds {each}; median {median:.3f}x (target <= {target:.2f}x: {verdict})")

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
    single_case = TrainerCase(GPT(model_config(args), seed=0), args)
    single_times = [single_case.step(i) for i in range(args.warmup + args.rounds * args.steps)][args.warmup :]
    single = {"median_s": statistics.median(single_times)}
    full_bytes = GPT(model_config(args)).num_params() * 4
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(rank_main, args=(free_port(), args, queue), nprocs=WORLD_SIZE, start_method="spawn")
    report(single, queue.get(), full_bytes, args)


if __name__ == "__main__":
    main()
