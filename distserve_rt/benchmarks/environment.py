"""What a benchmark result must carry to be read later: when, which commit, which machine,
which versions, which command (BENCHMARKS.md, "Results kept")."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

import distserve_rt
from distserve_rt import _native


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_name(device: str | torch.device = "cpu") -> str:
    """What a latency profile was measured on: the GPU's name, or the CPU model."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def git_commit() -> str:
    root = Path(distserve_rt.__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out + ("-dirty" if dirty else "")


def environment() -> dict[str, object]:
    env: dict[str, object] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {
            "cpu": cpu_model(),
            "num_cpus": os.cpu_count(),
            "platform": platform.platform(),
            # 1/5/15-minute load when the result was taken: on a shared machine it says how
            # much the numbers may be disturbed.
            "load_average": list(os.getloadavg()),
        },
        "threads": {
            "distserve_rt": _native.get_num_threads(),
            "torch": torch.get_num_threads(),
        },
        "versions": {
            "distserve_rt": distserve_rt.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    if torch.cuda.is_available():
        env["machine"]["gpu"] = torch.cuda.get_device_name()  # type: ignore[index]
    return env


def save_result(path: str | Path, payload: dict[str, object]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**environment(), **payload}, indent=2) + "\n")
    return path
