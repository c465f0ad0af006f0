"""`fsdp-nb` command: to-fsdp2 flags and files as in `accelerate to-fsdp2`, one-line errors, the subcommand table."""

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fsdp_nb import cli

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FSDP1, FSDP2 = EXAMPLES / "accelerate_fsdp1.yaml", EXAMPLES / "accelerate_fsdp2.yaml"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_to_fsdp2_writes_output_file_and_prints_notes(tmp_path, capsys):
    out_file = tmp_path / "fsdp2.yaml"
    code, out, err = run(capsys, "to-fsdp2", "--config_file", str(FSDP1), "--output_file", str(out_file))
    assert (code, err) == (0, "")
    assert yaml.safe_load(out_file.read_text()) == yaml.safe_load(FSDP2.read_text())
    assert out.splitlines()[0] == f"{FSDP1} -> {out_file}"
    assert "  - fsdp_reshard_after_forward: FULL_SHARD -> fsdp_reshard_after_forward: true" in out.splitlines()
    assert list(yaml.safe_load(out_file.read_text())) == list(yaml.safe_load(FSDP1.read_text()))  # key order kept


def test_overwrite_without_output_file_rewrites_the_input(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    shutil.copy(FSDP1, config)
    code, _, err = run(capsys, "to-fsdp2", "--config_file", str(config), "--overwrite")
    assert (code, err) == (0, "")
    assert yaml.safe_load(config.read_text()) == yaml.safe_load(FSDP2.read_text())


def test_overwrite_replaces_an_existing_output_file(tmp_path, capsys):
    out_file = tmp_path / "out.yaml"
    out_file.write_text("old: true\n")
    assert run(capsys, "to-fsdp2", "--config_file", str(FSDP1), "--output_file", str(out_file), "--overwrite")[0] == 0
    assert yaml.safe_load(out_file.read_text())["fsdp_config"]["fsdp_version"] == 2


def error_line(capsys, *argv: str) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err
    return err.strip()


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    existing = tmp_path / "exists.yaml"
    existing.write_text("x: 1\n")
    missing = tmp_path / "missing.yaml"
    assert (
        error_line(capsys, "to-fsdp2", "--config_file", str(missing), "--output_file", "o.yaml")
        == f"fsdp-nb: error: config file {missing} not found"
    )
    assert error_line(capsys, "to-fsdp2", "--config_file", str(FSDP1)) == (
        "fsdp-nb: error: --output_file is required unless --overwrite is set (then the config file is rewritten)"
    )
    assert (
        error_line(capsys, "to-fsdp2", "--config_file", str(FSDP1), "--output_file", str(existing))
        == f"fsdp-nb: error: output file {existing} already exists; pass --overwrite to replace it"
    )
    assert existing.read_text() == "x: 1\n"


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "the file is empty"),
        ("a: [b", "not valid YAML (while parsing"),
        ("- 1\n- 2\n", "expected a mapping of Accelerate options, got list"),
    ],
)
def test_bad_input_files(tmp_path, capsys, text, problem):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    line = error_line(capsys, "to-fsdp2", "--config_file", str(bad), "--output_file", str(tmp_path / "o.yaml"))
    assert line.startswith(f"fsdp-nb: error: {bad}: {problem}")
    assert not (tmp_path / "o.yaml").exists()


def test_argparse_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["to-fsdp2"])
    assert info.value.code == 2
    assert capsys.readouterr().err == "fsdp-nb to-fsdp2: error: the following arguments are required: --config_file\n"
    with pytest.raises(SystemExit):
        cli.main(["no-such-command"])
    assert capsys.readouterr().err.startswith("fsdp-nb: error: argument COMMAND: invalid choice: 'no-such-command'")


def test_a_new_table_row_is_a_new_subcommand(monkeypatch, capsys):
    seen = []

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--steps", type=int, default=1)

    def run_it(args: argparse.Namespace) -> int:
        seen.append(args.steps)
        if args.steps < 0:
            raise ValueError("steps=-1 is not valid; accepted: an int >= 0")
        return 0

    row = cli.Subcommand(name="demo", help="a demo", add_arguments=add_arguments, run=run_it)
    monkeypatch.setattr(cli, "SUBCOMMANDS", cli.SUBCOMMANDS + (row,))
    assert cli.main(["demo", "--steps", "3"]) == 0 and seen == [3]
    assert error_line(capsys, "demo", "--steps", "-1") == "fsdp-nb: error: steps=-1 is not valid; accepted: an int >= 0"


def test_command_line_process(tmp_path):
    """The real entry point once: exit codes and streams as a shell sees them."""
    out_file = tmp_path / "out.yaml"
    argv = [
        sys.executable,
        "-m",
        "fsdp_nb.cli",
        "to-fsdp2",
        "--config_file",
        str(FSDP1),
        "--output_file",
        str(out_file),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ok = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert (ok.returncode, ok.stderr) == (0, "")
    assert yaml.safe_load(out_file.read_text())["fsdp_config"]["fsdp_version"] == 2
    bad = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == f"fsdp-nb: error: output file {out_file} already exists; pass --overwrite to replace it\n"


def test_train_subcommand_is_wired_and_reports_config_errors_in_one_line(tmp_path, capsys):
    """`train` comes from fsdp_nb.train; a bad run file fails before any training starts."""
    assert [c.name for c in cli.SUBCOMMANDS] == ["to-fsdp2", "merge-weights", "verify", "train"]
    missing = tmp_path / "missing.yaml"
    assert error_line(capsys, "train", "--config", str(missing)).startswith("fsdp-nb: error: No such file or directory")
    run_file = tmp_path / "run.yaml"
    run_file.write_text("fsdp:\n  fsdp_version: 2\n  sharding_stratgy: FULL_SHARD\n")
    assert error_line(capsys, "train", "--config", str(run_file)).startswith(
        "fsdp-nb: error: unknown FSDPConfig field 'sharding_stratgy' (did you mean 'sharding_strategy'?)"
    )
