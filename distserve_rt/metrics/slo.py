"""SLO attainment and latency percentiles over a set of requests.

Shared by the planner's simulator and (later) `drt-run bench` on measured requests, so a
simulated and a measured run are scored by the same code. Inputs are per-request arrays in
seconds: ``ttft[i]`` is time to first token, ``tpot[i]`` the mean time per output token
after the first (0 for a one-token output). A request that failed or never finished
carries ``inf`` and so misses every SLO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PERCENTILES = (50.0, 90.0, 99.0)
"""The percentiles DistServe's benchmark scripts print for TTFT and TPOT."""


@dataclass(frozen=True, slots=True)
class SLO:
    """Latency objectives of one workload, in seconds."""

    ttft_s: float
    """Time to first token."""
    tpot_s: float
    """Mean time per output token after the first."""

    def __post_init__(self) -> None:
        for key in ("ttft_s", "tpot_s"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{key} must be a positive finite number (s), got {value!r}")

    def scaled(self, factor: float) -> SLO:
        """Both objectives times ``factor`` (the paper's "SLO scale")."""
        if not factor > 0:
            raise ValueError(f"factor must be > 0, got {factor!r}")
        return SLO(self.ttft_s * factor, self.tpot_s * factor)


@dataclass(frozen=True, slots=True)
class Attainment:
    """Fractions of requests (0..1) meeting the SLOs."""

    joint: float
    """Both TTFT and TPOT met (the paper's definition)."""
    ttft: float
    tpot: float


def _as_arrays(ttft, tpot) -> tuple[np.ndarray, np.ndarray]:
    ttft = np.asarray(ttft, dtype=np.float64)
    tpot = np.asarray(tpot, dtype=np.float64)
    if ttft.shape != tpot.shape or ttft.ndim != 1:
        raise ValueError(
            f"ttft and tpot must be 1-D arrays of one length, got {ttft.shape} and {tpot.shape}"
        )
    if ttft.size == 0:
        raise ValueError("no requests to score (ttft is empty)")
    return ttft, tpot


def attainment(ttft, tpot, slo: SLO) -> Attainment:
    """Joint and per-metric SLO attainment of the requests ``ttft``/``tpot`` ([n] seconds)."""
    ttft, tpot = _as_arrays(ttft, tpot)
    ok_ttft = ttft <= slo.ttft_s
    ok_tpot = tpot <= slo.tpot_s
    return Attainment(
        joint=float(np.mean(ok_ttft & ok_tpot)),
        ttft=float(np.mean(ok_ttft)),
        tpot=float(np.mean(ok_tpot)),
    )


def slo_scale(ttft, tpot, slo: SLO, target: float = 0.9) -> float:
    """The tightest factor ``s`` such that a ``target`` fraction meets both ``slo.scaled(s)``.

    Exact, not searched: a request meets ``slo.scaled(s)`` iff ``max(ttft/T, tpot/P) <= s``,
    so the answer is the ``target`` quantile (the ceil(target*n)-th smallest) of that ratio.
    This is the value a bisection over ``s`` converges to. ``inf`` if too many requests failed.
    """
    if not 0 < target <= 1:
        raise ValueError(f"target must be in (0, 1], got {target!r}")
    ttft, tpot = _as_arrays(ttft, tpot)
    ratio = np.sort(np.maximum(ttft / slo.ttft_s, tpot / slo.tpot_s))
    k = max(1, math.ceil(target * ratio.size - 1e-9))
    return float(ratio[k - 1])


def latency_percentiles(values, percentiles=PERCENTILES) -> dict[str, float]:
    """``{"p50": ..., "p90": ..., "p99": ...}`` in the units of ``values`` (numpy's linear rule)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no values to summarise")
    got = np.percentile(values, percentiles)
    return {f"p{p:g}": float(v) for p, v in zip(percentiles, got, strict=True)}


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """What one run reports: attainment, TTFT/TPOT percentiles (s), request goodput (req/s)."""

    num_requests: int
    attainment: Attainment
    ttft: dict[str, float]
    tpot: dict[str, float]
    ttft_mean: float
    tpot_mean: float
    request_goodput: float
    """Requests per second that met both SLOs (what `vllm bench serve` calls goodput)."""

    def to_dict(self) -> dict[str, object]:
        return {
            "num_requests": self.num_requests,
            "attainment": {
                "joint": self.attainment.joint,
                "ttft": self.attainment.ttft,
                "tpot": self.attainment.tpot,
            },
            "ttft_s": {**self.ttft, "mean": self.ttft_mean},
            "tpot_s": {**self.tpot, "mean": self.tpot_mean},
            "request_goodput": self.request_goodput,
        }


def summarize(ttft, tpot, slo: SLO, duration_s: float) -> LatencySummary:
    """Score a run of requests that took ``duration_s`` seconds (first arrival to last finish)."""
    ttft, tpot = _as_arrays(ttft, tpot)
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s!r}")
    att = attainment(ttft, tpot, slo)
    return LatencySummary(
        num_requests=int(ttft.size),
        attainment=att,
        ttft=latency_percentiles(ttft),
        tpot=latency_percentiles(tpot),
        ttft_mean=float(np.mean(ttft)),
        tpot_mean=float(np.mean(tpot)),
        request_goodput=att.joint * ttft.size / duration_s,
    )
