"""Session start time and cell round trip, each against a floor measured in the same run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/session.py [--cells 300] [--starts 3]

Start: `%fsdp_launch -n 2` in a real IPython shell, against the bare floor of spawning 2
processes that init_process_group (gloo) and pass one barrier:
- cold, in a fresh kernel, in the same cell as `%load_ext` (the fork server still
  importing torch), and with the spawn fallback (FSDP_NB_FORKSERVER=0). Target: <= 1.3x.
- after a warm `%load_ext` (the fork server has preloaded torch). Target: <= 0.5x. Also
  in a fresh kernel that has not imported torch, which it then imports for its TCPStore.
- `%fsdp_restart` of 2 ranks, no save pending. Target: <= 0.3 s; its stop and start
  halves are printed beside it.
The fork server's idle memory (no ranks) is read from /proc/<pid>/smaps_rollup.
Round trip: the median of a trivial `x = 1` cell on 2 ranks (through `%%fsdp` and through
Session.run), against a bare duplex-pipe round trip to 2 spawned echo processes.
Target: median <= 1 ms. With ipyparallel installed, its two figures are printed too.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


# ---- floors -------------------------------------------------------------------------
def _floor_rank(rank: int, port: int, q) -> None:
    import datetime

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=60)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timeout)
    dist.barrier()
    q.put(rank)
    dist.destroy_process_group()
    os._exit(0)


def floor_start() -> float:
    """Seconds until 2 spawned ranks have joined a gloo group and passed a barrier."""
    import torch.distributed as dist

    ctx = mp.get_context("spawn")
    # The parent holds the store, as fsdp_nb's kernel does: a port chosen and then freed
    # could be taken by another process before rank 0 listened on it.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    q = ctx.SimpleQueue()
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_floor_rank, args=(r, store.port, q)) for r in range(2)]
    for p in procs:
        p.start()
    q.get(), q.get()
    took = time.perf_counter() - t0
    for p in procs:
        p.join()
    return took


def _echo(conn) -> None:
    while True:
        msg = conn.recv()
        if msg is None:
            return
        conn.send(msg)


def floor_pipe_roundtrip(n: int) -> list[float]:
    """Round trips of a small message to 2 spawned echo processes over duplex pipes."""
    ctx = mp.get_context("spawn")
    ends, procs = [], []
    for _ in range(2):
        a, b = ctx.Pipe(duplex=True)
        p = ctx.Process(target=_echo, args=(b,))
        p.start()
        ends.append(a)
        procs.append(p)
    times = []
    for i in range(n + 20):
        t0 = time.perf_counter()
        for c in ends:
            c.send(("x = 1", i))
        for c in ends:
            c.recv()
        times.append(time.perf_counter() - t0)
    for c, p in zip(ends, procs):
        c.send(None)
        p.join()
    return times[20:]


# ---- fsdp_nb ------------------------------------------------------------------------
FRESH_KERNEL = """
import sys, time
if sys.argv[1] == "torch":
    import torch  # the kernel has torch imported before a launch; so does the floor
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
shell.run_line_magic("load_ext", "fsdp_nb")
if sys.argv[2] == "warm":
    from fsdp_nb.session import forkserver
    forkserver.wait()
t0 = time.perf_counter()
shell.run_line_magic("fsdp_launch", "-n 2")
print("TOOK", time.perf_counter() - t0)
"""


def fresh_launch(*, forkserver: bool = True, kernel_torch: bool = True, warm: bool = False) -> float:
    """`%fsdp_launch -n 2` after `%load_ext fsdp_nb` in a fresh kernel process: at once, or once
    the fork server is warm."""
    env = {**os.environ, "FSDP_NB_FORKSERVER": "1" if forkserver else "0"}
    args = ["torch" if kernel_torch else "no-torch", "warm" if warm else "at-once"]
    out = subprocess.run(
        [sys.executable, "-c", FRESH_KERNEL, *args], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.split("TOOK")[1])


def idle_memory(pid: int) -> dict[str, int]:
    """kB of a process, from /proc/<pid>/smaps_rollup: Rss, Pss, and Uss (its private pages)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        rows = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f.read().splitlines()[1:])}
    return dict(Rss=rows["Rss"], Pss=rows["Pss"], Uss=rows["Private_Clean"] + rows["Private_Dirty"])


def fsdp_nb_figures(cells: int, starts: int) -> dict:
    from IPython.core.interactiveshell import InteractiveShell

    import fsdp_nb
    from fsdp_nb.session import forkserver
    from fsdp_nb.session.output import Silent

    shell = InteractiveShell.instance()
    t0 = time.perf_counter()
    shell.run_line_magic("load_ext", "fsdp_nb")
    load_ext = time.perf_counter() - t0
    forkserver.wait()  # the user reads the notebook while the server imports torch
    start_times = []
    for _ in range(starts):
        t0 = time.perf_counter()
        shell.run_line_magic("fsdp_launch", "-n 2")
        start_times.append(time.perf_counter() - t0)
        server = fsdp_nb.current_session().eval("__import__('os').getppid()")[0]
        shell.run_line_magic("fsdp_shutdown", "")
    time.sleep(0.5)  # the ranks' pages leave the server's PSS once they have exited
    memory = idle_memory(server)
    shell.run_line_magic("fsdp_launch", "-n 2")
    s = fsdp_nb.current_session()
    restart, stop, start = [], [], []
    for _ in range(3 * starts):
        t0 = time.perf_counter()
        shell.run_line_magic("fsdp_restart", "")
        restart.append(time.perf_counter() - t0)
    for _ in range(3 * starts):  # the same restart, halved
        t0 = time.perf_counter()
        s.close()
        t1 = time.perf_counter()
        s.start()
        stop.append(t1 - t0)
        start.append(time.perf_counter() - t1)
    magic_rt, run_rt = [], []
    for _ in range(cells + 20):
        t0 = time.perf_counter()
        shell.run_cell_magic("fsdp", "", "x = 1")
        magic_rt.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        s.run("x = 1", output=Silent())
        run_rt.append(time.perf_counter() - t0)
    shell.run_line_magic("fsdp_shutdown", "")
    return dict(
        load_ext=load_ext,
        start=start_times,
        restart=restart,
        stop=stop,
        start_half=start,
        memory=memory,
        magic=magic_rt[20:],
        run=run_rt[20:],
    )


def ipyparallel_figures(cells: int) -> dict | None:
    try:
        import ipyparallel as ipp
    except ImportError:
        return None
    t0 = time.perf_counter()
    cluster = ipp.Cluster(n=2, log_level=40)
    rc = cluster.start_and_connect_sync()
    rc.wait_for_engines(2, timeout=120)
    start = time.perf_counter() - t0
    view = rc[:]
    times = []
    for _ in range(cells + 20):
        t0 = time.perf_counter()
        view.execute("x = 1", block=True)
        times.append(time.perf_counter() - t0)
    cluster.stop_cluster_sync()
    return dict(start=[start], run=times[20:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=300)
    ap.add_argument("--starts", type=int, default=3)
    args = ap.parse_args()
    import torch  # noqa: F401  (the kernel has torch imported before a launch; so does the floor)

    floors = [floor_start() for _ in range(args.starts)]
    pipe = floor_pipe_roundtrip(args.cells)
    cold = [fresh_launch() for _ in range(args.starts)]
    spawned = [fresh_launch(forkserver=False) for _ in range(args.starts)]
    no_torch = [fresh_launch(kernel_torch=False, warm=True) for _ in range(args.starts)]
    ours = fsdp_nb_figures(args.cells, args.starts)
    ms = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
    med = statistics.median
    f_start, o_start = med(floors), med(ours["start"])
    print(f"start   floor (spawn 2 + init_process_group + barrier): {f_start:.2f} s")
    print(
        f"start   %fsdp_launch -n 2 at once after %load_ext:     {med(cold):.2f} s   ratio {med(cold) / f_start:.2f}x (target <= 1.3x)"
    )
    print(
        f"start   the same, spawn fallback (FSDP_NB_FORKSERVER=0): {med(spawned):.2f} s   ratio {med(spawned) / f_start:.2f}x (target <= 1.3x)"
    )
    print(
        f"start   %fsdp_launch -n 2 after a warm %load_ext:      {o_start:.2f} s   ratio {o_start / f_start:.2f}x (target <= 0.5x)"
    )
    print(
        f"start   the same, in a kernel that has not imported torch: {med(no_torch):.2f} s   ratio {med(no_torch) / f_start:.2f}x "
        "(%load_ext imports it in the background)"
    )
    r, stop, start = med(ours["restart"]), med(ours["stop"]), med(ours["start_half"])
    print(
        f"start   %fsdp_restart, 2 ranks:                        {r:.3f} s  ratio {r / f_start:.2f}x (target <= 0.3 s; "
        f"stop {stop:.3f} s + start {start:.3f} s)"
    )
    mem = ours["memory"]
    print(
        f"memory  idle fork server (smaps_rollup):               Rss {mem['Rss'] / 1024:.0f} MiB, "
        f"Pss {mem['Pss'] / 1024:.0f} MiB, Uss {mem['Uss'] / 1024:.0f} MiB; %load_ext {ours['load_ext']:.2f} s"
    )
    print(f"cell    floor (bare pipe round trip, 2 procs):         {ms(pipe):.3f} ms")
    print(
        f"cell    Session.run('x = 1'):                          {ms(ours['run']):.3f} ms   ratio {ms(ours['run']) / ms(pipe):.1f}x"
    )
    print(
        f"cell    %%fsdp x = 1:                                  {ms(ours['magic']):.3f} ms   ratio {ms(ours['magic']) / ms(pipe):.1f}x (target median <= 1 ms)"
    )
    ipp = ipyparallel_figures(args.cells)
    if ipp is None:
        print("ipyparallel: not installed (pip install ipyparallel to compare)")
    else:
        print(
            f"ipyparallel start (Cluster n=2):                       {ipp['start'][0]:.2f} s   ratio {ipp['start'][0] / f_start:.2f}x"
        )
        print(
            f"ipyparallel view.execute('x = 1'):                     {ms(ipp['run']):.3f} ms   ratio {ms(ipp['run']) / ms(pipe):.1f}x"
        )


if __name__ == "__main__":
    main()
