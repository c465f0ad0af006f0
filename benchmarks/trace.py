"""What tracing costs: step time with the recorder on against the same steps with it off.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/trace.py [--steps 20] [--rounds 3]

One 2-rank session, the benchmark GPT (4 blocks, width 128, block 64, global batch
8) under FSDP1 and FSDP2. Each round takes `--steps` steps untraced and `--steps`
steps through `fsdp_nb.trace_step`, alternating which goes first; reported is the
median step time of each (the slowest rank's), and their ratio. Target: <= 1.10x.
Off, tracing costs nothing by construction: no hook or wrapper is installed.
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("OMP_NUM_THREADS", "1")

from fsdp_nb import Session  # noqa: E402
from fsdp_nb.session.output import Silent  # noqa: E402

SETUP = """
import time, warnings
warnings.filterwarnings("ignore")
from fsdp_nb import FSDPConfig, GPT, GPTConfig, TrainConfig, Trainer, trace_step
from fsdp_nb.data import ByteBlocks, stdlib_corpus
data = ByteBlocks(stdlib_corpus(400_000), 64)
trainers = {
    version: Trainer(GPT(GPTConfig(n_layer=4, n_embd=128, n_head=4, block_size=64), seed=0), data,
                     TrainConfig(steps=10_000, global_batch_size=8, log_interval=0),
                     fsdp=FSDPConfig(fsdp_version=version, auto_wrap_policy="TRANSFORMER_BASED_WRAP"))
    for version in (1, 2)
}
for t in trainers.values():
    for _ in range(3):
        t.history.append(t.train_step(len(t.history)))

def untraced(t, n):
    out = []
    for _ in range(n):
        start = time.perf_counter()
        t.history.append(t.train_step(len(t.history)))
        out.append(time.perf_counter() - start)
    return out

def traced(t, n):
    return list(trace_step(t, steps=n).step_seconds())
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with Session(2, timeout=120) as s:
        s.run(SETUP, output=Silent()).raise_errors()
        for version in (1, 2):
            off, on = [], []
            for r in range(args.rounds):
                order = ("untraced", "traced") if r % 2 == 0 else ("traced", "untraced")
                for kind in order:
                    times = s.eval(f"{kind}(trainers[{version}], {args.steps})")
                    slowest = [max(step) for step in zip(*times)]
                    (off if kind == "untraced" else on).extend(slowest)
            a, b = statistics.median(off), statistics.median(on)
            print(
                f"FSDP{version}: untraced {a * 1e3:6.1f} ms, traced {b * 1e3:6.1f} ms per step: "
                f"{b / a:.3f}x (target <= 1.10x)"
            )


if __name__ == "__main__":
    main()
