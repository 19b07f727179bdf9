"""Scores one run: latency statistics, throughput, SLO attainment, request goodput, SLO scale.

Definitions follow ``vllm bench serve`` so numbers compare: latency statistics over the
successful requests (TPOT over those with more than one output token; ITL over every gap
of every successful request), throughput over the run's duration. Attainment and the SLO
scale come from `distserve_rt.metrics.slo` (the planner's simulator is scored by the same
code) over *all* requests: a failed request carries ``inf`` and so misses every SLO.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from distserve_rt.benchmarks.serving.record import RequestRecord
from distserve_rt.benchmarks.serving.vllm_flags import count_good
from distserve_rt.metrics.slo import SLO, Attainment, attainment, latency_percentiles, slo_scale

REPORTED_PERCENTILES = (50.0, 90.0, 99.0)


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """Milliseconds; every field None when there was no value (e.g. every request failed)."""

    mean: float | None
    median: float | None
    std: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    percentiles: dict[float, float | None] = field(default_factory=dict)
    """Every percentile asked for (``--metric-percentiles``) -> ms, the three above included."""

    @classmethod
    def of(cls, values_s: list[float], percentiles: tuple[float, ...] = ()) -> LatencyStats:
        asked = tuple(dict.fromkeys((*REPORTED_PERCENTILES, *percentiles)))
        if not values_s:
            return cls(None, None, None, None, None, None, dict.fromkeys(asked))
        ms = np.asarray(values_s, dtype=np.float64) * 1000.0
        got = np.percentile(ms, asked)  # numpy's linear rule, as vLLM and latency_percentiles
        by_p = {p: float(v) for p, v in zip(asked, got, strict=True)}
        fixed = latency_percentiles(ms, REPORTED_PERCENTILES)
        return cls(float(ms.mean()), float(np.median(ms)), float(ms.std()), *fixed.values(), by_p)


@dataclass(frozen=True)
class ServingMetrics:
    """One run's score (rates in req/s, throughput in tokens/s)."""

    num_requests: int
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    """Prompt tokens of the successful requests (vLLM counts those only)."""
    total_output_tokens: int
    request_throughput: float
    request_goodput: float
    """Requests per second that met both SLOs; with ``goodput_ms`` (``--goodput``), those
    that met every one of its objectives, counted as ``vllm bench serve --goodput`` does."""
    output_throughput: float
    total_token_throughput: float
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2el: LatencyStats
    slo: SLO
    target: float
    attainment: Attainment
    slo_scale: float
    """Tightest factor on both SLOs that ``target`` of the requests meet (inf: too many
    failed)."""
    goodput_ms: dict[str, float] | None = None
    """``--goodput``'s objectives (ms by metric) when given."""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def slo_arrays(records: list[RequestRecord]) -> tuple[np.ndarray, np.ndarray]:
    """Per-request TTFT and TPOT (s, float64 ``[num_requests]``); inf for failures."""
    ttft = np.array([r.ttft if r.success else math.inf for r in records], dtype=np.float64)
    tpot = np.array([r.tpot if r.success else math.inf for r in records], dtype=np.float64)
    return ttft, tpot


def compute_metrics(
    records: list[RequestRecord],
    duration_s: float,
    slo: SLO,
    target: float = 0.9,
    *,
    percentiles: tuple[float, ...] = (),
    goodput_ms: dict[str, float] | None = None,
) -> ServingMetrics:
    """Scores ``records`` of a run that took ``duration_s`` seconds; ``percentiles`` are
    computed besides p50/p90/p99, ``goodput_ms`` (``--goodput``) decides request_goodput."""
    if not records:
        raise ValueError("no request records to score")
    ok = [r for r in records if r.success]
    ttft, tpot = slo_arrays(records)
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s!r}")
    att = attainment(ttft, tpot, slo)
    num_in = sum(r.prompt_len for r in ok)
    num_out = sum(r.output_len for r in ok)
    if goodput_ms:
        good = count_good(
            [r.ttft for r in ok], [r.tpot for r in ok], [r.e2e for r in ok], goodput_ms
        )
    else:
        good = att.joint * len(records)
    pct = tuple(percentiles)
    return ServingMetrics(
        num_requests=len(records),
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration_s,
        total_input_tokens=num_in,
        total_output_tokens=num_out,
        request_throughput=len(ok) / duration_s,
        request_goodput=good / duration_s,
        output_throughput=num_out / duration_s,
        total_token_throughput=(num_in + num_out) / duration_s,
        ttft=LatencyStats.of([r.ttft for r in ok], pct),
        tpot=LatencyStats.of([r.tpot for r in ok if r.output_len > 1], pct),
        itl=LatencyStats.of([gap for r in ok for gap in r.itl], pct),
        e2el=LatencyStats.of([r.e2e for r in ok], pct),
        slo=slo,
        target=target,
        attainment=att,
        slo_scale=slo_scale(ttft, tpot, slo, target),
        goodput_ms=dict(goodput_ms) if goodput_ms else None,
    )


def engine_breakdown_ms(records: list[RequestRecord]) -> dict[str, float] | None:
    """Mean engine-side queueing, TTFT, TPOT and e2e (ms) of the successful requests that
    carry `RequestMetrics` (in-process runs); None when none does."""
    metrics = [r.engine_metrics for r in records if r.success and r.engine_metrics is not None]
    if not metrics:
        return None
    out: dict[str, float] = {}
    for key in ("time_in_queue", "ttft", "tpot", "e2e_latency"):
        values = [getattr(m, key) for m in metrics if getattr(m, key) is not None]
        if values:
            out[f"mean_{key}_ms"] = 1000.0 * float(np.mean(values))
    out["mean_num_preemptions"] = float(np.mean([m.num_preemptions for m in metrics]))
    return out
