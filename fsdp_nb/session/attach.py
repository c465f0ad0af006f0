"""The kernel's endpoint for attach mode: ranks that torchrun starts on other machines join here.

    s = Session.listen("7000", nnodes=2, nproc_per_node=4)   # or %fsdp_launch --listen 7000 ...

prints the torchrun (and srun) command to run on each node and returns once every rank
joined. Why this shape: torchrun owns the processes (its agents start, watch and clean
up the ranks on their nodes, SLURM starts the agents), and the kernel only needs a way
in, so each rank dials back to the kernel instead of the kernel reaching into nodes.

Security: what flows here is pickles, and unpickling runs code. So every connection
goes through `multiprocessing.connection.Listener(..., authkey=key)`: an HMAC
challenge both ways, before a single byte is unpickled. The key is 32 random bytes per
session, in a file created with mode 0600 (O_CREAT | O_EXCL, never chmod-ed later) that
the command names; the endpoint binds 127.0.0.1 unless a host is named. A peer that
cannot prove the key is refused with one printed line, and the session goes on.

Each rank opens two connections (see fsdp_nb/session/attached.py for why), says who
it is (Hello: rank, world size, host, PID, versions), and is refused with one line when
its versions differ from the kernel's, its rank is outside the world or already joined,
or the session is not waiting for ranks.
"""

from __future__ import annotations

import os
import secrets
import shlex
import socket
import threading
import time
from multiprocessing.connection import AuthenticationError, Listener

from fsdp_nb.session import protocol as P
from fsdp_nb.session.attached import AttachedGroup, AttachedRank
from fsdp_nb.session.errors import SessionError
from fsdp_nb.session.results import rank_list

HELLO_TIMEOUT_S = 10.0  # a peer that proved the key but says nothing is dropped after this
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parse_address(text: str) -> tuple[str, int]:
    """'[HOST:]PORT' -> (host, port); the host defaults to 127.0.0.1 (this machine only)."""
    host, _, port = str(text).rpartition(":")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(
            f"--listen {text!r} is not valid: give [HOST:]PORT, e.g. --listen 7000 or --listen 0.0.0.0:7000"
        )
    return host or "127.0.0.1", int(port)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_key(path: str, key: bytes) -> None:
    """Create `path` readable by this user only, atomically: O_EXCL, mode 0600 from the start."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)


def kernel_versions() -> tuple[str, str]:
    import torch

    import fsdp_nb

    return fsdp_nb.__version__, torch.__version__


class Endpoint:
    """The listening socket, the key file and the ranks joining one session."""

    def __init__(
        self, address, nnodes: int, nproc_per_node: int, *, rdzv_endpoint=None, key_file=None, join_timeout=None
    ):
        for name, n in (("--nnodes", nnodes), ("--nproc-per-node", nproc_per_node)):
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"{name} {n!r} is not valid: give a whole number >= 1, e.g. {name} 2")
        self.host, self.port = parse_address(address)
        self.nnodes, self.nproc_per_node, self.world = nnodes, nproc_per_node, nnodes * nproc_per_node
        self.join_timeout = join_timeout
        self.key = secrets.token_bytes(32)
        self.key_file = key_file or os.path.join(
            os.path.expanduser("~"), ".fsdp_nb", f"session-{os.getpid()}-{secrets.token_hex(4)}.key"
        )
        if rdzv_endpoint is None and self.host in LOOPBACK:
            rdzv_endpoint = f"127.0.0.1:{_free_port('127.0.0.1')}"
        self.rdzv_endpoint = rdzv_endpoint  # None: the first node's name, which only the nodes know
        self.rdzv_id = secrets.token_hex(4)
        self.versions = kernel_versions()
        self.notes: list[str] = []  # every refusal, as printed
        self._listener: Listener | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._joining: dict[int, AttachedRank] = {}
        self._accepting = False
        self._options: dict = {}
        self._gathered = False

    # ---- open / close --------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._listener is not None

    def open(self) -> None:
        write_key(self.key_file, self.key)
        try:
            self._listener = Listener((self.host, self.port), family="AF_INET", authkey=self.key)
        except OSError as e:
            os.unlink(self.key_file)
            raise SessionError(f"cannot listen on {self.host}:{self.port}: {e.strerror}; choose another port") from None
        self.port = self._listener.address[1]  # port 0 picked one; a restart listens on the same
        self._thread = threading.Thread(target=self._accept_loop, name="fsdp_nb-attach", daemon=True)
        self._thread.start()

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        try:  # wake the blocked accept(): closing the socket alone does not on Linux
            socket.create_connection((self._dial_host(), self.port), timeout=1).close()
        except OSError:
            pass
        self._thread.join(2)
        listener.close()
        with self._cond:
            for rk in self._joining.values():
                rk.close()
            self._joining, self._accepting = {}, False
        try:
            os.unlink(self.key_file)
        except FileNotFoundError:
            pass

    def _dial_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    # ---- what the user runs ----------------------------------------------------------
    def session_address(self) -> str:
        host = socket.getfqdn() if self.host in ("0.0.0.0", "") else self.host
        return f"{host}:{self.port}"

    def commands(self) -> tuple[str, str]:
        """The torchrun command to run on each node, and its srun form for a SLURM allocation."""
        tail = f"-m fsdp_nb.attach --session {self.session_address()} --key-file {shlex.quote(self.key_file)}"
        rdzv = self.rdzv_endpoint or "FIRST_NODE:29400"
        sizes = f"--nnodes {self.nnodes} --nproc-per-node {self.nproc_per_node} --rdzv-backend c10d"
        torchrun = f"torchrun {sizes} --rdzv-endpoint {rdzv} --rdzv-id {self.rdzv_id} {tail}"
        head = '"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"'
        srun = (
            f"srun --nodes {self.nnodes} --ntasks-per-node 1 torchrun {sizes} "
            f'--rdzv-endpoint {head}:29400 --rdzv-id "$SLURM_JOB_ID" {tail}'
        )
        return torchrun, srun

    def instructions(self) -> str:
        torchrun, srun = self.commands()
        lines = [
            f"fsdp_nb: listening on {self.host}:{self.port} for {self.world} ranks "
            f"({self.nnodes} nodes x {self.nproc_per_node}); run on each node:",
            f"    {torchrun}",
        ]
        if self.rdzv_endpoint is None:
            lines.append("  (FIRST_NODE: the host name of one of the nodes, the same on every node)")
        lines += ["or, inside a SLURM allocation:", f"    {srun}"]
        if self.host in LOOPBACK:
            lines.append(f"  ({self.host} is reachable from this machine only: name a host to attach other machines,"
                         " e.g. --listen 0.0.0.0:7000)")  # fmt: skip
        lines.append(f"  the key file {self.key_file} must be readable on each node (mode 0600)")
        return "\n".join(lines)

    # ---- joining ---------------------------------------------------------------------
    def gather(self, cfg) -> AttachedGroup:
        """Wait until every rank joined (Hello on both connections), then until each joined torchrun's
        process group (Ready). Ctrl-C stops waiting; ranks that had joined are let go."""
        if not self.is_open:
            self.open()
            print(self.instructions())
        elif self._gathered:  # a restart: torchrun's agents exited with their ranks
            print("fsdp_nb: the ranks were stopped; start them again on each node:\n" + self.instructions())
        self._gathered = True
        self._options = dict(backend=cfg.backend, device=cfg.device, timeout=cfg.timeout, threads=cfg.threads)
        deadline = None if self.join_timeout is None else time.monotonic() + self.join_timeout
        with self._cond:
            self._joining, self._accepting = {}, True
        try:
            while True:
                with self._cond:
                    self._prune()
                    joined = {r: rk for r, rk in self._joining.items() if rk.control is not None}
                    if len(joined) == self.world:
                        self._accepting, self._joining = False, {}
                        break
                    self._cond.wait(0.25)
                if deadline is not None and time.monotonic() > deadline:
                    missing = sorted(set(range(self.world)) - set(joined))
                    raise SessionError(
                        f"{rank_list(missing)} did not attach within {self.join_timeout:.0f} s: "
                        "run the command printed by %fsdp_launch --listen on each node"
                    )
            group = AttachedGroup([joined[r] for r in range(self.world)])
        except BaseException:
            with self._cond:
                for rk in self._joining.values():
                    rk.close()
                self._joining, self._accepting = {}, False
            raise
        try:
            group.wait_ready(cfg.timeout)
        except BaseException:
            group.kill()
            raise
        return group

    def _prune(self) -> None:
        """Forget joined ranks whose connection closed (their torchrun gave up), so a new try can join."""
        for r, rk in list(self._joining.items()):
            try:
                while rk.control is not None and rk.control.poll():
                    rk.control.recv()  # heartbeats
            except (EOFError, OSError):
                rk.close()
                del self._joining[r]

    def _refuse(self, conn, line: str) -> None:
        try:
            if conn is not None:
                conn.send(P.Refused(line))
        except OSError:
            pass
        finally:
            if conn is not None:
                conn.close()
        self.notes.append(line)
        print(f"fsdp_nb: {line}", flush=True)

    def _accept_loop(self) -> None:
        listener = self._listener
        while self._listener is listener:
            try:
                conn = listener.accept()
            except AuthenticationError as e:
                self._refuse(None, f"refused a connection from {_peer(listener)}: it does not hold this session's key "
                                   f"({e}); the session is unaffected")  # fmt: skip
                continue
            except (OSError, EOFError) as e:
                if self._listener is listener:
                    self._refuse(None, f"refused a connection from {_peer(listener)}: {type(e).__name__}: {e}")
                continue
            if self._listener is not listener:
                conn.close()
                return
            try:
                self._hello(conn)
            except (OSError, EOFError):
                conn.close()

    def _hello(self, conn) -> None:
        if not conn.poll(HELLO_TIMEOUT_S):
            return self._refuse(conn, "refused a connection that proved the key but did not say which rank it is")
        msg = conn.recv()
        if not isinstance(msg, P.Hello):
            return self._refuse(conn, f"refused a connection that sent {type(msg).__name__} instead of Hello")
        with self._cond:
            why = self._check(msg)
            if why:
                return self._refuse(conn, why)
            if msg.role == "data":
                rk = AttachedRank(msg, conn, secrets.token_hex(8))
                self._joining[msg.rank] = rk
                conn.send(P.Welcome(rk.token, self._options))
            else:
                rk = self._joining[msg.rank]
                rk.control, rk.seen = conn, time.monotonic()
                conn.send(P.Welcome(rk.token))
                self._cond.notify_all()

    def _check(self, hello: P.Hello) -> str | None:
        """Why this rank may not join, in one line that says what to do; None when it may."""
        fv, tv = self.versions
        who = f"rank {hello.rank} (pid {hello.pid} on {hello.host})"
        if (hello.fsdp_nb_version, hello.torch_version) != (fv, tv):
            return (
                f"refused {who}: it runs fsdp_nb {hello.fsdp_nb_version} with torch {hello.torch_version} but the "
                f"notebook runs fsdp_nb {fv} with torch {tv}; install the same versions on every node"
            )
        if hello.world_size != self.world:
            return (
                f"refused {who}: torchrun started {hello.world_size} ranks but this session waits for {self.world} "
                f"({self.nnodes} nodes x {self.nproc_per_node}); run the command %fsdp_launch printed"
            )
        if not 0 <= hello.rank < self.world:
            return (
                f"refused {who}: this session's ranks are 0 to {self.world - 1}; run the command %fsdp_launch printed"
            )
        if hello.role == "control":
            rk = self._joining.get(hello.rank)
            if rk is None or rk.token != hello.token or rk.control is not None:
                return f"refused a control connection for {who}: it does not match the rank that joined"
            return None
        if not self._accepting:
            return f"refused {who}: this session is not waiting for ranks; run %fsdp_restart to attach new ones"
        if hello.rank in self._joining:
            old = self._joining[hello.rank]
            return (
                f"refused {who}: rank {hello.rank} already joined (pid {old.pid} on {old.host}); "
                "each rank joins once: stop the extra torchrun"
            )
        return None


def _peer(listener) -> str:
    try:
        host, port = listener.last_accepted
        return f"{host}:{port}"
    except Exception:
        return "an unknown peer"


def open_session(cls, address, nnodes, nproc_per_node, wait, options):
    """Session.listen's body: the session (CLOSED), its endpoint open and the commands printed."""
    where = {k: options.pop(k) for k in ("rdzv_endpoint", "key_file", "join_timeout") if k in options}
    endpoint = Endpoint(address, nnodes, nproc_per_node, **where)
    session = cls(endpoint.world, start=False, remote=True, **options)
    session.endpoint = endpoint
    endpoint.open()
    print(endpoint.instructions())
    if wait:
        session.start()
    return session
