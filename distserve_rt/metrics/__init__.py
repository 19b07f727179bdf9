"""Request-level serving metrics: SLO attainment, latency percentiles, goodput."""

from distserve_rt.metrics.rate_search import search_rate
from distserve_rt.metrics.slo import (
    SLO,
    Attainment,
    LatencySummary,
    attainment,
    latency_percentiles,
    slo_scale,
    summarize,
)

__all__ = [
    "SLO",
    "Attainment",
    "LatencySummary",
    "attainment",
    "latency_percentiles",
    "search_rate",
    "slo_scale",
    "summarize",
]
