"""Goodput and attainment estimated until they are stable, as intervals, not points.

A few hundred simulated requests are a transient, not a steady state: the planner's answer
changed with the seed (OPT-175B on 4 x 8 at 4 req/s: 3 x colocated tp8 for seeds 0 and 3,
a 4-node pair for seeds 1 and 2, 300 requests each) and one configuration went from 93%
to 21% attainment between 300 and 2000 requests. So an estimate here

- discards a warm-up prefix (the first ``warmup_fraction`` of the requests, by arrival:
  they meet an empty system, which flatters every rate),
- splits the rest into ``num_batches`` batches in arrival order and takes the batch means'
  95% confidence interval (batches of consecutive requests are nearly independent where
  single requests, which share a queue, are not),
- grows the number of requests, from ``min_requests`` by a factor ``growth`` up to
  ``max_requests``, until the interval's half-width is at most ``tolerance`` or the
  interval is clear of the target (the search only asks which side a rate is on). Near
  the target the batches stay correlated and the run goes to the cap (OPT-175B at its
  goodput: ± 5-25 points at 4000 requests); above capacity the queue grows, the later
  batches fail more than the earlier ones and the mean shows the overload.

Goodput is searched on the mean, then bounded by the nearest rates, in steps of 5%,
whose whole interval meets (``low``) or misses (``high``) the target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from distserve_rt.metrics.rate_search import search_rate
from distserve_rt.metrics.slo import SLO
from distserve_rt.planner.goodput import GoodputEvaluator
from distserve_rt.planner.simulator import SimMode, SimResult
from distserve_rt.workloads.workload import Workload

# Student t 0.975 quantiles by degrees of freedom: the batch means' 95% interval.
_T975 = {4: 2.776, 5: 2.571, 7: 2.365, 9: 2.262, 14: 2.145, 19: 2.093}


@dataclass(frozen=True)
class Estimate:
    """SLO attainment (fraction of requests) with its 95% interval ``mean ± half_width``."""

    mean: float
    half_width: float
    num_requests: int
    """Requests simulated, warm-up included."""

    @property
    def low(self) -> float:
        return max(0.0, self.mean - self.half_width)

    @property
    def high(self) -> float:
        return min(1.0, self.mean + self.half_width)


def batch_means(met: np.ndarray, *, warmup_fraction: float = 0.1, num_batches: int = 10):
    """`Estimate` of the rate of ``met`` (bool ``[num_requests]``, in arrival order) after
    the warm-up, from the means of ``num_batches`` consecutive batches."""
    if num_batches not in {k + 1 for k in _T975}:
        allowed = sorted(k + 1 for k in _T975)
        raise ValueError(f"num_batches must be one of {allowed}, got {num_batches!r}")
    if not 0 <= warmup_fraction < 1:
        raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction!r}")
    kept = np.asarray(met, dtype=np.float64)[int(len(met) * warmup_fraction) :]
    if kept.size < num_batches:
        raise ValueError(
            f"{kept.size} requests after the warm-up cannot make {num_batches} batches"
        )
    means = np.array([b.mean() for b in np.array_split(kept, num_batches)])
    half = _T975[num_batches - 1] * means.std(ddof=1) / np.sqrt(num_batches)
    return Estimate(float(means.mean()), float(half), int(len(met)))


@dataclass(frozen=True)
class StableGoodput:
    """Highest rate whose mean attainment meets the target (req/s), and around it the
    nearest rates (steps of 5%, at most 4) whose whole interval meets it (``low``) and
    misses it (``high``)."""

    rate: float
    low: float
    high: float
    curve: tuple[tuple[float, float, float], ...] = ()
    """(rate, mean attainment, half-width) of every rate simulated, sorted by rate."""


@dataclass
class SteadyState:
    """Stable estimates for the configurations of one plan.

    ``pool`` is what requests are drawn from (the dataset, not a sample of it): the longest
    run is ``max_requests`` of them drawn with ``seed``; shorter runs are its prefixes, and
    every rate replays the same requests and unit gaps (common random numbers)."""

    pool: Workload
    slo: SLO
    target: float = 0.9
    rel_tol: float = 0.03
    cv: float = 1.0
    seed: int = 0
    min_requests: int = 1000
    max_requests: int = 4000
    tolerance: float = 0.02
    """Largest half-width of the attainment interval that stops the growth."""
    warmup_fraction: float = 0.1
    num_batches: int = 10
    growth: int = 4
    """Factor between one run's requests and the next one's (the last is the cap)."""
    probe_steps: int = 2
    """Steps of 5% from the goodput that look for each end of its interval."""
    _runs: list[GoodputEvaluator] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.min_requests <= self.max_requests:
            raise ValueError(
                f"need 0 < min_requests <= max_requests, got {self.min_requests!r} and "
                f"{self.max_requests!r}"
            )
        if not 0 < self.tolerance < 1:
            raise ValueError(f"tolerance must be in (0, 1), got {self.tolerance!r}")
        if isinstance(self.growth, bool) or not isinstance(self.growth, int) or self.growth < 2:
            raise ValueError(f"growth must be an int >= 2, got {self.growth!r}")
        longest = self.pool.sample(self.max_requests, seed=self.seed)
        sizes, n = [], self.min_requests
        while n < self.max_requests:
            sizes.append(n)
            n *= self.growth
        sizes.append(self.max_requests)
        self._runs = [self._evaluator(longest, n) for n in sizes]

    def _evaluator(self, longest: Workload, n: int) -> GoodputEvaluator:
        w = Workload(longest.name, longest.prompt_lens[:n], longest.output_lens[:n])
        return GoodputEvaluator(w, self.slo, self.target, self.rel_tol, self.cv, self.seed)

    @property
    def longest(self) -> GoodputEvaluator:
        return self._runs[-1]

    def attainment(
        self, spec, rate: float, *, mode=SimMode.FULL, policy=None
    ) -> tuple[Estimate, SimResult]:
        """Attainment of ``spec`` at ``rate`` req/s (arguments as in
        `GoodputEvaluator.simulate`), and the last run's result (its percentiles)."""
        mode = SimMode(mode)
        for run in self._runs:
            result = run.simulate(spec, rate, mode=mode, policy=policy)
            est = batch_means(
                run.met(result, mode),
                warmup_fraction=self.warmup_fraction,
                num_batches=self.num_batches,
            )
            # Tight, or clear of the target whichever way: the search only asks
            # which side of the target a rate is on.
            if est.half_width <= self.tolerance or not est.low <= self.target <= est.high:
                break
        return est, result

    def goodput(self, spec, *, mode=SimMode.FULL, policy=None, rate_hint: float = 1.0):
        """`StableGoodput` of ``spec`` (arguments as in `GoodputEvaluator.goodput`);
        ``rate_hint`` should be close (the screened goodput): the search steps from it by
        ``step`` before it bisects, as every rate costs thousands of requests here."""
        mode = SimMode(mode)
        bound = self.longest.rate_bound(spec, mode, policy)
        seen: dict[float, Estimate] = {}

        def at(rate: float) -> Estimate:
            if rate not in seen:
                if rate > bound:  # above steady-state throughput: the queue grows forever
                    seen[rate] = Estimate(0.0, 0.0, 0)
                else:
                    seen[rate] = self.attainment(spec, rate, mode=mode, policy=policy)[0]
            return seen[rate]

        bracket = self._bracket(lambda r: at(r).mean >= self.target, rate_hint)
        if bracket is None:  # the hint was far off: the generic bracket-then-bisect
            rate, _ = search_rate(
                lambda r: at(r).mean, self.target, rate_hint=rate_hint, rel_tol=self.rel_tol
            )
        else:
            lo, hi = bracket
            while hi - lo > self.rel_tol * hi:
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if at(mid).mean >= self.target else (lo, mid)
            rate = lo
        curve = tuple((r, e.mean, e.half_width) for r, e in sorted(seen.items()))
        if rate <= 0:
            return StableGoodput(0.0, 0.0, 0.0, curve)
        n = self.probe_steps
        low = self._probe(at, rate, 1 / 1.05, lambda e: e.low >= self.target, n)
        high = self._probe(at, rate, 1.05, lambda e: e.high < self.target, n)
        curve = tuple((r, e.mean, e.half_width) for r, e in sorted(seen.items()))
        return StableGoodput(rate, min(low, rate), max(high, rate), curve)

    @staticmethod
    def _probe(at, rate: float, factor: float, surely, max_steps: int = 4) -> float:
        """The first rate ``rate × factor^k`` (k = 1..``max_steps``) whose estimate
        ``surely`` meets (or misses) the target, else the last one tried: the interval's
        end on that side (rates the search already tried cost nothing)."""
        for _ in range(max_steps):
            rate *= factor
            if surely(at(rate)):
                break
        return rate

    def _bracket(self, ok, hint: float, step: float = 1.1, max_steps: int = 6):
        """(meets, misses) rates a factor ``step`` apart, stepping from ``hint``; None if
        ``max_steps`` steps do not cross the target."""
        rate = hint
        if ok(rate):
            for _ in range(max_steps):
                if not ok(rate * step):
                    return rate, rate * step
                rate *= step
            return None
        for _ in range(max_steps):
            if ok(rate / step):
                return rate / step, rate
            rate /= step
        return None
