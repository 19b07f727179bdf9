"""Arrival processes: Poisson, or gamma with a coefficient of variation (burstiness).

Arrivals at rate R are unit-rate gaps divided by R. The planner draws the unit gaps once per
seed and rescales them for every rate it tries (common random numbers): attainment then
falls monotonically with rate, which keeps the goodput bisection stable.
"""

from __future__ import annotations

import numpy as np


def unit_interarrivals(num_requests: int, *, cv: float = 1.0, seed: int = 0) -> np.ndarray:
    """Gaps with mean 1 and coefficient of variation ``cv`` (float64 ``[num_requests]``).

    ``cv == 1`` is Poisson (exponential gaps); otherwise gamma with shape ``1/cv**2``, as
    DistServe's and AlpaServe's burstiness studies use. The first gap is kept, so the first
    request arrives after one gap (not at 0).
    """
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests!r}")
    if not cv > 0:
        raise ValueError(f"cv must be > 0, got {cv!r}")
    rng = np.random.default_rng(seed)
    if cv == 1.0:
        return rng.exponential(1.0, num_requests)
    shape = 1.0 / (cv * cv)
    return rng.gamma(shape, 1.0 / shape, num_requests)


def arrival_times(num_requests: int, rate: float, *, cv: float = 1.0, seed: int = 0) -> np.ndarray:
    """Arrival times in seconds (float64 ``[num_requests]``, non-decreasing) at ``rate`` req/s."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate!r}")
    return np.cumsum(unit_interarrivals(num_requests, cv=cv, seed=seed)) / rate
