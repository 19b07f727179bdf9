"""Step-time noise: how far the engine's real steps scatter around the latency model.

On a shared machine the same batch takes 0.6-1.45x its median from one step to the next
(issue 15), and where an SLO sits close to the mean that spread decides attainment. A
simulator that multiplies every predicted step time by a draw from `StepTimeNoise` gets
the measured distribution instead of its mean.

The distribution is kept as an empirical quantile table of measured/predicted ratios
(`NUM_QUANTILES` evenly spaced probabilities, 0 and 1 included) and sampled by inverse
transform with linear interpolation between quantiles. The table is scaled so that this
sampler's mean is exactly 1: the latency model is fitted to the mean step
(`profile_fit.fit_engine_steps`), so model x noise keeps the mean and adds the spread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NUM_QUANTILES = 21
"""Quantiles stored per step kind (every 5%)."""


def _sampler_mean(quantiles: np.ndarray) -> float:
    """Mean of the piecewise-linear inverse-CDF sampler over ``quantiles`` (trapezoids)."""
    return float((quantiles[1:] + quantiles[:-1]).mean() / 2)


@dataclass(frozen=True, slots=True)
class StepTimeNoise:
    """Multiplicative step-time factors: ``sample(rng)`` has mean 1 (see module)."""

    quantiles: tuple[float, ...]
    """Factors at probabilities ``linspace(0, 1, len(quantiles))``, nondecreasing, > 0."""

    def __post_init__(self) -> None:
        q = tuple(float(x) for x in self.quantiles)
        ordered = all(a <= b for a, b in zip(q[:-1], q[1:], strict=True))
        if len(q) < 2 or not all(x > 0 for x in q) or not ordered:
            raise ValueError(
                f"step noise quantiles must be >= 2 positive nondecreasing numbers, "
                f"got {self.quantiles!r}"
            )
        object.__setattr__(self, "quantiles", q)

    @classmethod
    def from_ratios(cls, ratios: Sequence[float], num_quantiles: int = NUM_QUANTILES):
        """The noise of measured/predicted ``ratios`` (> 0), rescaled to mean 1."""
        r = np.asarray(ratios, dtype=np.float64)
        if r.size < 1 or not np.all(np.isfinite(r)) or np.any(r <= 0):
            raise ValueError(f"ratios must be a non-empty list of finite numbers > 0, got {r!r}")
        q = np.quantile(r, np.linspace(0.0, 1.0, num_quantiles))
        if q[-1] == q[0]:
            return cls((1.0,) * num_quantiles)
        return cls(tuple(q / _sampler_mean(q)))

    @classmethod
    def none(cls) -> StepTimeNoise:
        """No noise: every sample is 1."""
        return cls((1.0, 1.0))

    def sample(self, rng: np.random.Generator) -> float:
        """One factor to multiply a predicted step time by."""
        q = self.quantiles
        pos = rng.random() * (len(q) - 1)
        i = min(int(pos), len(q) - 2)
        return q[i] + (q[i + 1] - q[i]) * (pos - i)

    def mean(self) -> float:
        return _sampler_mean(np.asarray(self.quantiles))

    def to_list(self) -> list[float]:
        return list(self.quantiles)
