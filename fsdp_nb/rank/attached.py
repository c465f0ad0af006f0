"""A rank that torchrun started and that attaches to a listening kernel (`python -m fsdp_nb.attach`).

It serves the same protocol and loop as a spawned rank (worker.serve); only its start
and its lifetime differ, because the kernel is not its parent:
- Start: read torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK), connect to the kernel
  twice with the session key (multiprocessing's HMAC handshake both ways, before any
  pickle), say who it is (Hello), and get the session's options (Welcome) or one line
  why not (Refused: print it, exit 1). Then join torchrun's process group (env://) with
  the session's timeout, and say Ready. Connecting first lets the kernel refuse a rank
  with the wrong versions before it joins any collective.
- Interrupts come as a message on the control connection; this thread turns them into
  a SIGINT to this process, so the worker's handler raises KeyboardInterrupt in user code
  only, exactly as for a spawned rank.
- Liveness: a heartbeat each second both ways. The kernel gone (connection closed, or
  silent for KERNEL_SILENCE_S once it has spoken) -> exit 0, after pending saves (so
  torchrun, seeing success, restarts nothing). The torchrun agent gone (our parent
  changed) -> exit at once: no orphans on any node.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
from multiprocessing.connection import AuthenticationError, Client
from typing import NoReturn

from fsdp_nb.rank import worker
from fsdp_nb.session import protocol as P

HEARTBEAT_S = 1.0
KERNEL_SILENCE_S = 8.0  # well inside the 10 s in which a rank must notice a dead kernel
CONNECT_TIMEOUT_S = 30.0


def _fail(line: str) -> NoReturn:
    print(f"fsdp_nb.attach: {line}", file=sys.stderr, flush=True)
    os._exit(1)


def _connect(address: tuple[str, int], key: bytes, deadline: float):
    while True:
        try:
            return Client(address, family="AF_INET", authkey=key)
        except AuthenticationError:
            _fail(f"the notebook at {address[0]}:{address[1]} refused this key: use the key file it printed")
        except OSError as e:
            if time.monotonic() > deadline:
                _fail(f"cannot reach the notebook at {address[0]}:{address[1]} ({e.strerror or e}); "
                      "is %fsdp_launch --listen still waiting there?")  # fmt: skip
            time.sleep(0.5)


def _hello(conn, role: str, rank: int, world_size: int, versions, token: str = "") -> P.Welcome:
    conn.send(P.Hello(role, rank, world_size, socket.gethostname(), os.getpid(), *versions, token))
    try:
        reply = conn.recv()
    except (EOFError, OSError):
        _fail("the notebook closed the connection before accepting this rank")
    if isinstance(reply, P.Refused):
        _fail(reply.reason)
    return reply


def _watch_agent(agent_pid: int) -> None:
    """Exit within 0.2 s of torchrun's agent dying (this process is then re-parented): no orphans."""
    while os.getppid() == agent_pid:
        time.sleep(worker.WATCHDOG_PERIOD_S)
    worker._exit(0)


def _control(conn, state: worker._Rank) -> None:
    """Heartbeats both ways; Interrupt -> SIGINT to ourselves (the handler decides); kernel gone -> exit 0."""
    heard, beat = None, 0.0
    while True:
        try:
            if conn.poll(0.25):
                msg = conn.recv()
                heard = time.monotonic()
                if isinstance(msg, P.Interrupt):
                    os.kill(os.getpid(), signal.SIGINT)
            now = time.monotonic()
            if now - beat >= HEARTBEAT_S:
                conn.send(P.Heartbeat())
                beat = now
        except (EOFError, OSError):
            worker._exit(0)
        if heard is not None and time.monotonic() - heard > KERNEL_SILENCE_S:
            worker._exit(0)


def _init_process_group(local_rank: int, opts: dict):
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(opts["threads"])
    if opts["device"] == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(opts["backend"], init_method="env://", timeout=datetime.timedelta(seconds=opts["timeout"]))
    return torch, dist, device


def main(argv: list[str] | None = None) -> NoReturn:
    parser = argparse.ArgumentParser(prog="python -m fsdp_nb.attach", description=__doc__.splitlines()[0])
    parser.add_argument("--session", required=True, help="HOST:PORT that %%fsdp_launch --listen printed")
    parser.add_argument("--key-file", required=True, help="the session's key file that it printed")
    parser.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT_S)
    args = parser.parse_args(argv)
    try:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        _fail("RANK and WORLD_SIZE are not set: run this under torchrun, with the command %fsdp_launch printed")
    host, _, port = args.session.rpartition(":")
    if not host or not port.isdigit():
        _fail(f"--session {args.session!r} is not HOST:PORT: copy the command %fsdp_launch printed")
    try:
        with open(args.key_file, "rb") as f:
            key = f.read()
    except OSError as e:
        _fail(f"cannot read the key file {args.key_file}: {e.strerror}; copy it to this node (mode 0600)")

    import torch

    import fsdp_nb

    versions = (fsdp_nb.__version__, torch.__version__)
    deadline = time.monotonic() + args.connect_timeout
    data = _connect((host, int(port)), key, deadline)
    welcome = _hello(data, "data", rank, world_size, versions)
    control = _connect((host, int(port)), key, deadline)
    _hello(control, "control", rank, world_size, versions, welcome.token)
    opts = welcome.options

    os.environ.update(OMP_NUM_THREADS=str(opts["threads"]), MPLBACKEND="module://fsdp_nb.rank.mpl_backend")
    state = worker._Rank(rank, world_size, data)
    signal.signal(signal.SIGINT, state.on_sigint)
    threading.Thread(target=_control, args=(control, state), name="fsdp_nb-control", daemon=True).start()
    threading.Thread(target=_watch_agent, args=(os.getppid(),), daemon=True).start()
    try:
        torch, dist, device = _init_process_group(local_rank, opts)
    except BaseException as e:
        data.send(P.StartFailed(rank, f"{type(e).__name__}: {e}"))
        os._exit(1)
    worker.serve(state, torch, dist, device, opts["backend"])
