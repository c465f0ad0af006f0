"""Session start time and cell round trip, each against a floor measured in the same run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/session.py [--cells 300] [--starts 3]

Start: `%fsdp_launch -n 2` in a real IPython shell, against the bare floor of spawning 2
processes that init_process_group (gloo) and pass one barrier. Target: <= 1.3x.
Round trip: the median of a trivial `x = 1` cell on 2 ranks (through `%%fsdp` and through
Session.run), against a bare duplex-pipe round trip to 2 spawned echo processes.
Target: median <= 1 ms. With ipyparallel installed, its two figures are printed too.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


# ---- floors -------------------------------------------------------------------------
def _floor_rank(rank: int, port: int, q) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    dist.barrier()
    q.put(rank)
    dist.destroy_process_group()
    os._exit(0)


def floor_start() -> float:
    """Seconds until 2 spawned ranks have joined a gloo group and passed a barrier."""
    ctx = mp.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    q = ctx.SimpleQueue()
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_floor_rank, args=(r, port, q)) for r in range(2)]
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
def fsdp_nb_figures(cells: int, starts: int) -> dict:
    from IPython.core.interactiveshell import InteractiveShell

    import fsdp_nb
    from fsdp_nb.session.output import Silent

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "fsdp_nb")
    start_times = []
    for _ in range(starts):
        t0 = time.perf_counter()
        shell.run_line_magic("fsdp_launch", "-n 2")
        start_times.append(time.perf_counter() - t0)
        shell.run_line_magic("fsdp_shutdown", "")
    shell.run_line_magic("fsdp_launch", "-n 2")
    s = fsdp_nb.current_session()
    magic_rt, run_rt = [], []
    for _ in range(cells + 20):
        t0 = time.perf_counter()
        shell.run_cell_magic("fsdp", "", "x = 1")
        magic_rt.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        s.run("x = 1", output=Silent())
        run_rt.append(time.perf_counter() - t0)
    shell.run_line_magic("fsdp_shutdown", "")
    return dict(start=start_times, magic=magic_rt[20:], run=run_rt[20:])


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
    ours = fsdp_nb_figures(args.cells, args.starts)
    ms = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
    f_start, o_start = statistics.median(floors), statistics.median(ours["start"])
    print(f"start   floor (spawn 2 + init_process_group + barrier): {f_start:.2f} s")
    print(
        f"start   %fsdp_launch -n 2:                             {o_start:.2f} s   ratio {o_start / f_start:.2f}x (target <= 1.3x)"
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
