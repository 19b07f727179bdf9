"""The cost of a step after the engine idled: its thread pool sleeps while no request is
there (OMP_WAIT_POLICY=PASSIVE) and the first step after a wait runs slower. Measured on
this machine (2 threads: a 100-token prefill takes 9.5 ms back to back, 16-19 ms after
20-100 ms idle; 1 pinned thread: 13.0 ms -> 14.6 ms), it is paid by most prefills at low
rates and by every prefill of a 1P1D prefill instance, and no back-to-back profile sees it.

`measure_wake` times a fixed prefill after sleeps of increasing length in the engine itself;
`WakePenalty` is the extra time over back-to-back, interpolated in the idle time."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from distserve_rt.sampling_params import SamplingParams

IDLE_POINTS_S = (0.0, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
"""Idle times the penalty is measured at (s); beyond the last it stays at the last's."""


@dataclass(frozen=True, slots=True)
class WakePenalty:
    """Extra seconds of a step after ``idle_s`` of idleness: linear between the measured
    points, flat beyond them, 0 at and below the first (back to back)."""

    idle_s: tuple[float, ...]
    extra_s: tuple[float, ...]

    def __post_init__(self) -> None:
        ok = len(self.idle_s) == len(self.extra_s) >= 2 and all(
            a < b for a, b in zip(self.idle_s[:-1], self.idle_s[1:], strict=True)
        )
        if not ok or min(self.extra_s) < 0:
            raise ValueError(
                f"WakePenalty needs >= 2 increasing idle_s and as many extra_s >= 0, got "
                f"idle_s={self.idle_s!r}, extra_s={self.extra_s!r}"
            )

    def __call__(self, idle_s: float) -> float:
        return float(np.interp(idle_s, self.idle_s, self.extra_s))

    def to_dict(self) -> dict[str, list[float]]:
        return {"idle_s": list(self.idle_s), "extra_s": list(self.extra_s)}

    @classmethod
    def from_medians(cls, idle_s: Sequence[float], step_s: Sequence[float]) -> WakePenalty:
        """From the median step after each idle time (the first: back to back); an idle
        time faster than back to back (noise) counts as no penalty."""
        base = step_s[0]
        return cls(tuple(idle_s), tuple(max(0.0, s - base) for s in step_s))


def measure_wake(
    engine,
    prompt_len: int,
    *,
    repeats: int = 9,
    idle_points: Sequence[float] = IDLE_POINTS_S,
    sleep: Callable[[float], None] = time.sleep,
) -> WakePenalty:
    """Times one ``prompt_len``-token prefill (one-token output: the step is the request)
    after each idle time of ``idle_points`` (the first must be 0: back to back), ``repeats``
    times in rotation (a slow moment of the machine spreads over all points); the medians
    give the penalty. A back-to-back step is the last of three in a row: the one right
    after a sleep is still slow. ``engine``: an idle `LLMEngine` with its step log off, or
    a 1P1D `Controller` (its prefill instance's step, from the instance's own log)."""
    if not idle_points or idle_points[0] != 0:
        raise ValueError(f"idle_points must start at 0 (back to back), got {idle_points!r}")
    times: dict[float, list[float]] = {g: [] for g in idle_points}

    def one_step(tag: str) -> float:
        log = engine.enable_step_log(1 << 16)  # a fresh log: this request's step only
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        engine.add_request(tag, [1 + len(tag) % 5] * prompt_len, params)
        while engine.has_unfinished_requests():
            engine.step()
        return sum(rec.duration_s for rec in log.records())

    try:
        for r in range(repeats):
            for g in idle_points[1:]:
                sleep(g)
                times[g].append(one_step(f"wake-{r}-{g}"))
            times[0].append([one_step(f"busy-{r}-{k}") for k in range(3)][-1])
    finally:
        engine.disable_step_log()
    return WakePenalty.from_medians(
        list(idle_points), [float(np.median(times[g])) for g in idle_points]
    )
