"""CPU timing: median wall time of repeated calls after a warm-up (BENCHMARKS.md)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    median_s: float
    min_s: float
    num_runs: int


def time_call(fn: Callable[[], object], min_time_s: float = 0.3, min_runs: int = 5) -> Timing:
    """Runs `fn` once to warm up, then until both `min_runs` and `min_time_s` are reached."""
    fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_runs or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        if len(samples) >= 1000:
            break
    return Timing(statistics.median(samples), min(samples), len(samples))
