"""drt-run: the console script exists, helps, and rejects bad flags with a clear message."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distserve_rt.entrypoints.cli import main


def test_console_script_installed():
    # The venv's bin is not always on PATH (e.g. `.venv/bin/python -m pytest`).
    exe = shutil.which("drt-run") or str(Path(sys.executable).parent / "drt-run")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "bench-ops" in out


def test_bench_ops_rejects_bad_threads(capsys):
    with pytest.raises(SystemExit, match="--threads must be >= 1, got 0"):
        main(["bench-ops", "--threads", "0"])


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main(["no-such-command"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["simulate", "--prefill-tp", "0"], "argument --prefill-tp: must be an int >= 1, got 0"),
        (["simulate", "--rates", "-1"], "argument --rates: must be a finite number > 0, got -1"),
        (["plan", "--rate", "0"], "argument --rate: must be a finite number > 0, got 0"),
    ],
)
def test_planner_commands_name_the_bad_flag(capsys, argv, message):
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("command", [["simulate"], ["plan", "--rate", "1"]])
def test_planner_commands_refuse_an_unknown_model_in_one_line(command):
    with pytest.raises(SystemExit, match=f"drt-run {command[0]}: unknown model preset 'nope'"):
        main([*command, "--model", "nope"])
