"""The %fsdp_* magics: thin wrappers that parse flags, call the Session, and render.

The magics hold no session of their own: they drive `current_session()`, the one
`%fsdp_launch` made or `Session.activate()` bound, as ipyparallel's magics drive
the view that the user activated. Every bad input becomes a one-line UsageError
that says what to do; SessionError and config ValueErrors are translated here and
nowhere else.
"""

from __future__ import annotations

import time

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from fsdp_nb.session import session as _session
from fsdp_nb.session.errors import SessionError
from fsdp_nb.session.output import show_value
from fsdp_nb.session.session import Session, State


def _ranks_arg(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(
            f"--ranks {text!r} is not valid: give rank numbers separated by commas, e.g. --ranks 0,1"
        ) from None


@magics_class
class FSDPMagics(Magics):
    """Each magic is a few lines over the current session (`fsdp_nb.current_session()`)."""

    @property
    def session(self) -> Session | None:
        return _session._current

    # ---- lifecycle ----------------------------------------------------------------
    @magic_arguments()
    @argument("-n", "--nprocs", type=int, default=None, help="number of ranks (default 2)")
    @argument("--backend", choices=["gloo", "nccl"], default=None, help="default: gloo on cpu, nccl on cuda")
    @argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU per rank")
    @argument("--timeout", type=float, default=60.0, help="process-group timeout in seconds (default 60)")
    @argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    @argument("--listen", default=None, help="[HOST:]PORT: let torchrun's ranks attach here (several machines)")
    @argument("--nnodes", type=int, default=None, help="with --listen: number of nodes (torchrun agents)")
    @argument("--nproc-per-node", type=int, default=None, help="with --listen: ranks per node")
    @argument("--rdzv-endpoint", default=None, help="with --listen: HOST:PORT of torchrun's rendezvous")
    @argument("--key-file", default=None, help="with --listen: where to write the session key (mode 0600)")
    @line_magic
    def fsdp_launch(self, line):
        """Start a persistent session of N ranks: %fsdp_launch -n 2
        (or attach torchrun's ranks: %fsdp_launch --listen 7000 --nnodes 2 --nproc-per-node 4)"""
        args = parse_argstring(self.fsdp_launch, line)
        if self.session is not None and self.session.state != State.CLOSED:
            raise UsageError(
                f"a session is already running ({self.session.config.summary()}); "
                "use %fsdp_restart to start it again, or %fsdp_shutdown first"
            )
        t0 = time.perf_counter()
        if args.listen is not None or args.nnodes is not None or args.nproc_per_node is not None:
            session = self._listen(args)
            self._guard(session.start)  # waits for the ranks; Ctrl-C stops waiting
            self._summary("attached", time.perf_counter() - t0)
            return
        try:
            session = Session(
                2 if args.nprocs is None else args.nprocs,
                backend=args.backend,
                device=args.device,
                timeout=args.timeout,
                threads=args.threads,
                start=False,
            )
        except ValueError as e:
            raise UsageError(str(e)) from None
        session.activate()
        self._guard(session.start)
        self._summary("ready", time.perf_counter() - t0)

    def _listen(self, args) -> Session:
        from fsdp_nb.session.attach import open_session

        if args.listen is None or args.nnodes is None or args.nproc_per_node is None:
            raise UsageError("attach mode needs all three: --listen [HOST:]PORT --nnodes N --nproc-per-node K")
        if args.nprocs is not None and args.nprocs != args.nnodes * args.nproc_per_node:
            raise UsageError(
                f"-n {args.nprocs} does not match --nnodes {args.nnodes} x --nproc-per-node {args.nproc_per_node} "
                f"= {args.nnodes * args.nproc_per_node}: leave -n out, or make them agree"
            )
        options = dict(backend=args.backend, device=args.device, timeout=args.timeout, threads=args.threads)
        options.update(rdzv_endpoint=args.rdzv_endpoint, key_file=args.key_file)
        try:
            session = self._guard(
                lambda: open_session(Session, args.listen, args.nnodes, args.nproc_per_node, False, options)
            )
        except ValueError as e:
            raise UsageError(str(e)) from None
        return session.activate()

    @line_magic
    def fsdp_restart(self, line):
        """Kill the ranks and start fresh ones with the same options (also after %fsdp_shutdown)."""
        if self.session is None:
            raise UsageError("no session to restart; start one with %fsdp_launch -n 2")
        s = self.session
        t0 = time.perf_counter()
        self._guard(s.restart)
        self._summary("restarted", time.perf_counter() - t0)

    @line_magic
    def fsdp_shutdown(self, line):
        """Stop every rank."""
        if self.session is None or self.session.state == State.CLOSED:
            print("fsdp_nb: no session is running")
            return
        n = self.session.config.nprocs
        self.session.close()
        print(f"fsdp_nb: session shut down ({n} ranks stopped)")

    @line_magic
    def fsdp_status(self, line):
        """Ranks, PIDs, state and the running cell."""
        s = self.session
        if s is None or s.state == State.CLOSED:
            print("fsdp_nb: no session is running; start one with %fsdp_launch -n 2")
            return
        head = f"fsdp_nb session: {s.config.summary()}, state {s.state.value}"
        print(head + (f" ({s.broken_reason})" if s.broken_reason else ""))
        for row in s.status():
            running = f", running: {row['running']}" if row["running"] else ""
            where = f" on {row['host']}" if s.config.remote else ""  # attached ranks: which node
            print(f"  rank {row['rank']}: pid {row['pid']}{where}, {row['process']}{running}")

    # ---- cells and objects ----------------------------------------------------------
    @magic_arguments()
    @argument("--ranks", default=None, help="run on these ranks only, e.g. --ranks 0,2")
    @argument(
        "--collate",
        action="store_true",
        default=None,
        help="print each rank's output as one block, in rank order, when the cell ends",
    )
    @argument(
        "-o",
        "--output",
        dest="out_name",
        default=None,
        help="store each rank's result in this notebook variable, as a list indexed by rank",
    )
    @cell_magic
    def fsdp(self, line, cell):
        """Run the cell on every rank (or --ranks), streaming output with [rank N] prefixes."""
        args = parse_argstring(self.fsdp, line)
        s = self._session()
        ranks = _ranks_arg(args.ranks)
        result = self._guard(lambda: s.run(cell, ranks=ranks, collate=args.collate))
        for note in result.notes():
            print(note)
        values = result.values
        if args.out_name:
            self.shell.user_ns[args.out_name] = values
        elif not cell.rstrip().endswith(";"):
            for r in result.ranks:
                if r in result.dones and result.dones[r].value_repr is not None:
                    print(f"Out[rank {r}]: {values[r]}")  # already a repr: show it as is
                elif values[r] is not None:
                    show_value(r, values[r])
        result.raise_errors()

    @line_magic
    def fsdp_tb(self, line):
        """The whole traceback of the last cell that failed, on every rank that failed, as %tb shows one."""
        error = self.session.last_error if self.session is not None else None
        if error is None:
            print("fsdp_nb: no cell has failed in this session yet")
            return
        print(error.traceback())

    @line_magic
    def fsdp_push(self, line):
        """Copy notebook variables to every rank: %fsdp_push model_cfg data"""
        names = line.split()
        if not names:
            raise UsageError("name the notebook variables to send, e.g. %fsdp_push x y")
        missing = [n for n in names if n not in self.shell.user_ns]
        if missing:
            raise UsageError(f"{', '.join(missing)} not defined in the notebook; define it before %fsdp_push")
        s = self._session()
        self._guard(lambda: s.push({n: self.shell.user_ns[n] for n in names}))

    @line_magic
    def fsdp_pull(self, line):
        """A variable from every rank, as a list indexed by rank: x = %fsdp_pull x"""
        names = line.split()
        if len(names) != 1:
            raise UsageError("name one rank variable to fetch, e.g. x = %fsdp_pull x")
        s = self._session()
        return self._guard(lambda: s.pull(names[0]))

    @magic_arguments()
    @argument("name", help="a sharded module on the ranks (FSDP1 or FSDP2)")
    @argument(
        "--memory",
        dest="optimizer",
        nargs="?",
        const="",
        default=None,
        help="also show real per-rank bytes; name an optimizer to include its state",
    )
    @argument("--no-figure", dest="figure", action="store_false", help="print the tables only")
    @line_magic
    def fsdp_layout(self, line):
        """Draw how a module in the session is sharded, next to the other FSDP version: %fsdp_layout model"""
        from fsdp_nb import viz
        from fsdp_nb.layout.tp_plan import FSDP1_HAS_NO_TP
        from fsdp_nb.session import gather
        from fsdp_nb.viz.show import show_figure

        args = parse_argstring(self.fsdp_layout, line)
        s = self._session()
        fsdp1, fsdp2 = self._guard(lambda: gather.comparison(s, args.name))
        real = fsdp1 if fsdp1 is not None and fsdp1.observed_ranks else fsdp2
        print(f"{args.name}: read from the ranks")
        print(viz.format_layout(real))
        if fsdp1 is None:  # tensor parallel: nothing of FSDP1's to model
            print(f"{FSDP1_HAS_NO_TP}.")
        else:
            print("the other version, modelled for the same parameters:")
            print(viz.format_layout(fsdp2 if real is fsdp1 else fsdp1))
        if args.figure:
            show_figure(viz.plot_layout(fsdp1, fsdp2, args.name))  # an HSDP or TP mesh: its grid of ranks
        if args.optimizer is not None:
            reports = self._guard(lambda: gather.memory(s, args.name, args.optimizer or None))
            print(viz.format_memory(reports))
            if args.figure:
                show_figure(viz.plot_memory(reports))

    @magic_arguments()
    @argument("name", help="a Trainer on the ranks, or a function that runs one training step (then --model)")
    @argument("--steps", type=int, default=1, help="steps to trace (default 1)")
    @argument("--model", default=None, help="the sharded model a step function trains")
    @argument("--label", default=None, help="the trace's name in figures (default: NAME)")
    @argument("-o", "--output", dest="out_name", default=None, help="keep the Trace in this notebook variable")
    @argument("--no-figure", dest="figure", action="store_false", help="print the summary only")
    @line_magic
    def fsdp_trace(self, line):
        """Trace training steps on every rank and draw the per-rank timeline: %fsdp_trace trainer --steps 2"""
        from fsdp_nb.viz.show import show_figure
        from fsdp_nb.viz.timeline import plot_timeline

        args = parse_argstring(self.fsdp_trace, line)
        s = self._session()
        trace = self._guard(lambda: s.trace(args.name, steps=args.steps, model=args.model, label=args.label))
        if args.out_name:
            self.shell.user_ns[args.out_name] = trace
        print(trace.summary())
        if args.figure:
            show_figure(plot_timeline(trace))

    @line_magic
    def fsdp_export(self, line):
        """Write the cells run so far as a torchrun script: %fsdp_export train.py"""
        names = line.split()
        if len(names) != 1:
            raise UsageError("name the script to write, e.g. %fsdp_export train.py")
        s = self._session()
        text, warnings = s.export()
        try:
            with open(names[0], "w") as f:
                f.write(text)
        except OSError as e:
            raise UsageError(f"cannot write {names[0]}: {e.strerror}") from None
        cells = sum(step.source is not None for step in s.history)
        if s.endpoint is not None:  # attach mode: the same nodes, one agent each
            e = s.endpoint
            run = f"torchrun --nnodes {e.nnodes} --nproc-per-node {e.nproc_per_node} --rdzv-backend c10d "
            run += f"--rdzv-endpoint {e.rdzv_endpoint or 'FIRST_NODE:29400'} {names[0]} (on each node)"
        else:
            run = f"torchrun --standalone --nproc-per-node {s.config.nprocs} {names[0]}"
        print(f"fsdp_nb: wrote {names[0]} ({cells} cells); run it with: {run}")
        for w in warnings:
            print(f"warning: {w}")

    # ---- helpers ------------------------------------------------------------------
    def _session(self) -> Session:
        if self.session is None or self.session.state == State.CLOSED:
            raise UsageError("no session is running; start one with %fsdp_launch -n 2")
        return self.session

    @staticmethod
    def _guard(fn):
        try:
            return fn()
        except SessionError as e:
            raise UsageError(str(e)) from None

    def _summary(self, what: str, seconds: float) -> None:
        s = self.session
        print(
            f"fsdp_nb: {s.config.nprocs} ranks {what} (backend {s.config.backend}, device {s.config.device}, "
            f"torch {s.torch_version}) in {seconds:.1f} s"
        )


def load(ipython) -> None:
    from fsdp_nb.session import forkserver
    from fsdp_nb.viz.show import register_figure_formatter

    ipython.register_magics(FSDPMagics)
    register_figure_formatter(ipython)
    forkserver.warm()  # returns at once: the server imports torch while the user reads on
    forkserver.import_torch_in_background()  # and so does the kernel, for its rendezvous store


def unload(ipython) -> None:
    if _session._current is not None:
        _session._current.close()
