"""CPU time of the processes a run uses: the harness (the colocated engine, or the 1P1D
controller) and each disaggregated instance. On a 2-core machine the controller is a third
process beside two pinned instances: its share of a core is time an instance may lose,
which no step profile sees (issue 15's "three processes on two cores")."""

from __future__ import annotations

import os
import time


def process_cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds of ``pid`` (None: this process) so far; 0.0 when the
    process is gone or unreadable (a run's record must not fail on an instance that
    exited)."""
    if pid is None:
        return time.process_time()
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command name: state is field 3, utime and stime fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def engine_pids(engine) -> dict[str, int | None]:
    """``{"harness": None, "prefill": pid, "decode": pid}`` for a 1P1D `Controller`; the
    harness alone for an engine in this process."""
    pids: dict[str, int | None] = {"harness": None}
    if hasattr(engine, "prefills"):
        pids["prefill"] = engine.prefill(0).pid
        pids["decode"] = engine.decode(0).pid
    return pids


class CpuMeter:
    """CPU shares (CPU s / wall s) of each of ``pids`` between construction and `shares`."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self.wall0 = time.monotonic()
        self.cpu0 = {name: process_cpu_s(pid) for name, pid in pids.items()}

    def shares(self) -> dict[str, float]:
        wall = max(time.monotonic() - self.wall0, 1e-9)
        return {
            f"cpu_share_{name}": (process_cpu_s(pid) - self.cpu0[name]) / wall
            for name, pid in self.pids.items()
        }
