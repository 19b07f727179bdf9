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
