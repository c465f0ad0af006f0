"""The `fsdp-nb` command. Each subcommand is one row of `SUBCOMMANDS`.

A row names the subcommand, its one-line help, a function that adds its
arguments to an argparse parser, and the function that runs it with the parsed
arguments and returns an exit code. Adding a subcommand is adding a row; the
module that does the work keeps both functions (`train` lives in fsdp_nb.train).

Errors are one line on stderr and exit code 2, never a traceback: a CLI user
needs the file and the problem, not our call stack.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fsdp_nb.convert import convert_file_text
from fsdp_nb.runfile import add_train_arguments, cli_train

PROG = "fsdp-nb"


class CLIError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


@dataclass(frozen=True, kw_only=True)
class Subcommand:
    """One `fsdp-nb` subcommand."""

    name: str
    """What the user types after `fsdp-nb`."""
    help: str
    """One line for `fsdp-nb --help`."""
    add_arguments: Callable[[argparse.ArgumentParser], None]
    """Adds the subcommand's flags to its parser."""
    run: Callable[[argparse.Namespace], int]
    """Runs it with the parsed flags and returns the exit code; raises CLIError or ValueError for user errors."""


def _to_fsdp2_arguments(parser: argparse.ArgumentParser) -> None:
    # Flag names are `accelerate to-fsdp2`'s, so its users can swap the command name.
    parser.add_argument("--config_file", required=True, help="the Accelerate FSDP1 config file to convert")
    parser.add_argument(
        "--output_file",
        default=None,
        help="where to write the FSDP2 config; without it, --overwrite rewrites --config_file",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="allow replacing an existing file (the input itself without --output_file)",
    )


def to_fsdp2_command(args: argparse.Namespace) -> int:
    """Convert an Accelerate FSDP1 YAML file to FSDP2, as `accelerate to-fsdp2` does, and say what changed."""
    source = Path(args.config_file)
    if not source.exists():
        raise CLIError(f"config file {source} not found")
    if not source.is_file():
        kind = "a directory" if source.is_dir() else "not a regular file"
        raise CLIError(f"config file {source} is {kind}; pass the path of an Accelerate config file")
    if args.output_file is None and not args.overwrite:
        raise CLIError("--output_file is required unless --overwrite is set (then the config file is rewritten)")
    target = Path(args.output_file) if args.output_file is not None else source
    if target.is_dir():
        raise CLIError(f"output file {target} is a directory; pass a file path to --output_file")
    if target.exists() and not args.overwrite:
        raise CLIError(f"output file {target} already exists; pass --overwrite to replace it")
    if not target.parent.is_dir():
        if target.parent.exists():
            raise CLIError(f"output file {target}: {target.parent} is not a directory; pick another --output_file")
        raise CLIError(f"output file {target}: directory {target.parent} does not exist; create it first")
    try:
        data = source.read_bytes()
    except OSError as err:
        raise CLIError(f"config file {source}: cannot read it ({err.strerror or err}); check its permissions") from None
    try:
        text, notes = convert_file_text(data)  # round trip: comments and order survive
    except ValueError as err:
        raise CLIError(f"{source}: {err}") from None
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(target)  # never a half-written config, even with --overwrite of the input
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CLIError(
            f"output file {target}: cannot write it ({err.strerror or err}); pick another --output_file"
        ) from None
    print(f"{source} -> {target}")
    for note in notes:
        print(f"  - {note}")
    return 0


def _merge_arguments(parser: argparse.ArgumentParser) -> None:
    # Argument names are `accelerate merge-weights`'s.
    parser.add_argument("checkpoint_directory", help="a checkpoint written by save_checkpoint (sharded or full)")
    parser.add_argument(
        "output_path",
        help="the directory to write model.safetensors (or pytorch_model.bin) into; for a Transformers model, "
        "a directory from_pretrained loads (config, weights with adapters folded in, tokenizer)",
    )
    parser.add_argument(
        "--unsafe_serialization",
        action="store_true",
        help="write pytorch_model.bin (torch.save) instead of safetensors",
    )


def merge_command(args: argparse.Namespace) -> int:
    """Merge a checkpoint's weights into one file that a plain, unsharded model loads (for a Transformers
    model, a whole `from_pretrained` directory)."""
    from fsdp_nb.checkpoint import CheckpointError, merge_weights

    try:
        written = merge_weights(args.checkpoint_directory, args.output_path,
                                safe_serialization=not args.unsafe_serialization)  # fmt: skip
    except CheckpointError as err:
        raise CLIError(str(err)) from None
    print(f"{args.checkpoint_directory} -> {written}")
    return 0


def _verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint directory written by save_checkpoint")


def verify_command(args: argparse.Namespace) -> int:
    """Check that every file of a checkpoint is present and byte for byte as saved; one line either way."""
    import time

    from fsdp_nb.checkpoint import CheckpointError, verify

    start = time.perf_counter()
    try:
        manifest = verify(args.checkpoint)
    except CheckpointError as err:
        raise CLIError(str(err)) from None
    except KeyboardInterrupt:
        print(f"{PROG}: verify interrupted; nothing was checked to the end", file=sys.stderr)
        return 130
    what = "checksums match" if manifest.sha256 else "sizes match (saved without checksums)"
    print(f"ok: {manifest.path}: {len(manifest.files)} files, {sum(manifest.files.values())} bytes, {what}, "
          f"{time.perf_counter() - start:.2f} s")  # fmt: skip
    return 0


SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand(
        name="to-fsdp2",
        help="convert an Accelerate FSDP1 config file to FSDP2",
        add_arguments=_to_fsdp2_arguments,
        run=to_fsdp2_command,
    ),
    Subcommand(
        name="merge-weights",
        help="merge a checkpoint's weights into one model.safetensors (a from_pretrained directory for Transformers)",
        add_arguments=_merge_arguments,
        run=merge_command,
    ),
    Subcommand(
        name="verify",
        help="check that a checkpoint is complete and byte for byte as saved (exit 2 names a damaged file)",
        add_arguments=_verify_arguments,
        run=verify_command,
    ),
    Subcommand(
        name="train",
        help="train a small GPT from a YAML run file (under torchrun for several ranks)",
        add_arguments=add_train_arguments,
        run=cli_train,
    ),
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage too; we keep errors to one line
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The `fsdp-nb` parser with one subparser per row of SUBCOMMANDS."""
    parser = _Parser(prog=PROG, description="Learn, inspect and run PyTorch FSDP (FSDP1 and FSDP2).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for command in SUBCOMMANDS:
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(child)
        child.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fsdp-nb`; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (CLIError, ValueError, OSError) as err:
        message = str(err) if not isinstance(err, OSError) else f"{err.strerror or err}: {err.filename}"
        print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
