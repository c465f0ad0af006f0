"""Training inside an fsdp_nb Session against the same training under torchrun.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/session_overhead.py [--steps 20] [--warmup 5] [--rounds 6]

Both sides run the same source text: a `Trainer` on the GPT with FSDP2 (one unit per
Block), 2 ranks (gloo, one thread each). In the session it is a cell; under
`torchrun --standalone --nproc-per-node 2` it is a script with a few lines added to
save rank 0's history. Step time is the Trainer's own `step_time_s`, taken inside
each step, so process start-up, imports and sharding are excluded on both sides.

On a small VM, whole runs move by 10-20% with whatever else the machine does, and a
run that follows another is slower while the machine frees the first one's memory.
So each run waits `--settle` seconds first, and the rounds alternate which side goes
first (session-torchrun, then torchrun-session).

Reported: the median step time of each side over all measured steps (the first
`--warmup` of every run are dropped) and the throughput ratio session / torchrun
(torchrun's median over the session's), pooled and per round. Target: >= 0.97.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
NPROCS = 2

# The run both sides execute, word for word.
RUN = """
import warnings
warnings.filterwarnings("ignore")
from fsdp_nb.config import FSDPConfig
from fsdp_nb.data import ByteBlocks, stdlib_corpus
from fsdp_nb.models import GPT, GPTConfig
from fsdp_nb.train import TrainConfig, Trainer

gpt = GPTConfig(n_layer={layers}, n_embd={width}, n_head=4, block_size={block})
trainer = Trainer(GPT(gpt, seed=0), ByteBlocks(stdlib_corpus(400_000), gpt.block_size),
                  TrainConfig(steps={total}, global_batch_size={batch}, lr=1e-3, log_interval=1),
                  fsdp=FSDPConfig(fsdp_version=2, auto_wrap_policy="TRANSFORMER_BASED_WRAP"))
history = trainer.fit()
"""

# Added under torchrun only: save rank 0's history, then leave the process group cleanly.
SAVE = """
import gc, json
import torch.distributed as dist
if trainer.master_process:
    with open({out!r}, "w") as f:
        json.dump(history, f)
del trainer
gc.collect()  # FSDP state holds finished collectives; free it while the group exists
dist.barrier()
dist.destroy_process_group()
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="measured steps per round (>= 15)")
    p.add_argument("--warmup", type=int, default=5, help="steps dropped at the start of every round")
    p.add_argument("--rounds", type=int, default=6, help="session/torchrun pairs, alternating which goes first")
    p.add_argument(
        "--settle",
        type=float,
        default=5.0,
        help="seconds to wait before each run: freeing the last run's memory keeps a VM busy for a while",
    )
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="global batch size")
    return p.parse_args(argv)


def in_session(session, source: str) -> list[dict]:
    """Rank 0's history of `source` run as one session cell."""
    from fsdp_nb.session.output import Silent

    session.run(source, output=Silent()).raise_errors()
    history = session.eval("history")[0]
    session.run("del trainer, history\nimport gc; gc.collect()", output=Silent(), record=False).raise_errors()
    return history


def under_torchrun(source: str, workdir: Path, round_: int) -> list[dict]:
    """Rank 0's history of `source` run as a script under torchrun."""
    script, out = workdir / f"run{round_}.py", workdir / f"history{round_}.json"
    script.write_text(source + SAVE.format(out=str(out)))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(NPROCS),
        str(script),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:
        sys.exit(f"torchrun failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return json.loads(out.read_text())


def main(argv=None) -> None:
    args = parse_args(argv)
    from fsdp_nb import Session

    source = RUN.format(
        layers=args.layers, width=args.width, block=args.block, batch=args.batch, total=args.warmup + args.steps
    )
    times = {"session": [], "torchrun": []}  # every measured step
    rounds = {"session": [], "torchrun": []}  # each round's median
    losses = []  # every run's loss history: all must be equal
    with Session(NPROCS, threads=1, timeout=120) as session, tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for side in ("session", "torchrun") if r % 2 == 0 else ("torchrun", "session"):  # ABBA: order bias cancels
                time.sleep(args.settle)
                history = in_session(session, source) if side == "session" else under_torchrun(source, Path(tmp), r)
                measured = [h["step_time_s"] for h in history[args.warmup :]]
                times[side] += measured
                rounds[side].append(statistics.median(measured))
                losses.append([h["loss"] for h in history])
                print(
                    f"round {r + 1} {side:<8} median {rounds[side][-1] * 1e3:7.2f} ms over {len(measured)} steps",
                    flush=True,
                )
            print(
                f"round {r + 1} throughput ratio session / torchrun {rounds['torchrun'][-1] / rounds['session'][-1]:.3f}"
            )
    print(
        f"\nGPT n_layer={args.layers} n_embd={args.width} block={args.block}, global batch {args.batch}, "
        f"FSDP2, {NPROCS} ranks x 1 thread (gloo); {args.rounds} rounds x {args.steps} steps "
        f"after {args.warmup} warm-up"
    )
    print(
        f"torchrun side: OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone "
        f"--nproc-per-node {NPROCS} SCRIPT (the cell's source plus a history dump)"
    )
    session_ms, torchrun_ms = (statistics.median(times[k]) * 1e3 for k in ("session", "torchrun"))
    print(f"same losses in every run, both sides: {all(loss == losses[0] for loss in losses)}")
    print(f"median step  session {session_ms:.2f} ms   torchrun {torchrun_ms:.2f} ms")
    pairs = statistics.median(t / s for s, t in zip(rounds["session"], rounds["torchrun"]))
    print(
        f"throughput ratio session / torchrun: {torchrun_ms / session_ms:.3f}  (target >= 0.97); "
        f"median of the per-round ratios {pairs:.3f}"
    )
    # Other load on the machine moves whole rounds; a large spread means rerun on a quiet machine.
    spread = max(max(v) / min(v) for v in rounds.values())
    print(
        f"round-to-round spread of one side: {(spread - 1) * 100:.0f}%" + ("  (noisy machine)" if spread > 1.1 else "")
    )


if __name__ == "__main__":
    main()
