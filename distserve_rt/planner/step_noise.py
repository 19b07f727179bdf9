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

Slow steps come in runs: on a shared 2-core machine the ratio's lag-1 autocorrelation was
0.75-0.82, still 0.4-0.5 at lag 10 and 0.2 at lag 100 (another process holds a core for
hundreds of milliseconds). Independent draws average out over a request's decode steps and
over a queue's busy period, where the runtime's slow stretches do not: a simulator with
independent noise is optimistic near saturation. So the noise also carries an
``autocorrelation``: draws follow a Gaussian AR(1) process mapped through the quantile
table (a Gaussian copula: each draw keeps the measured distribution, consecutive draws are
correlated). Its coefficient is fitted to the variance of the measured ratios' means over
`CORRELATION_BLOCK_STEPS` consecutive steps (about one request's decode steps), the
time scale that decides TPOT and queueing, rather than to lag 1 alone, which would
understate the long slow stretches an AR(1) cannot otherwise reproduce.

A fitted noise also keeps the measured ratios themselves, in step order (``sequence``, up to
`MAX_SEQUENCE_STEPS`), and a simulated instance replays them: a stationary block bootstrap
(Politis & Romano 1994) continues the measured sequence from step to step and jumps to a
random position with probability 1/`REPLAY_MEAN_BLOCK_STEPS`. Each draw keeps the measured
distribution, and consecutive draws keep the measured dependence at every lag up to the
block length, not one AR(1) coefficient's. The AR(1) copula matched the block variance but
put the whole tail into its slow stretches, where the measured spikes are mostly isolated
and the slow stretches moderate; its variance also grows too little beyond 32 steps
(measured 25x the independent one over 128 steps, AR(1) 15x). Continuous batching at
28 req/s on 2 cores: runtime 80-86% attainment, AR(1) 74%, replayed 79-83% (bench/README).
The AR(1) process remains for noise without a sequence (profiles written before it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

NUM_QUANTILES = 21
"""Quantiles stored per step kind (every 5%)."""

CORRELATION_BLOCK_STEPS = 32
"""Steps per block whose mean's variance the autocorrelation is fitted to (see module)."""

MAX_AUTOCORRELATION = 0.999
"""Cap on the fitted coefficient (1 would freeze the process at its first draw)."""

MAX_SEQUENCE_STEPS = 4096
"""Measured ratios kept per step kind for replay (the first ones, in step order)."""

REPLAY_MEAN_BLOCK_STEPS = 256
"""Mean length of a replayed run of consecutive measured ratios (see module): longer than
a request's decode steps and a queue's busy period, so both see measured stretches."""

_NORMAL = NormalDist()


def _sampler_mean(quantiles: np.ndarray) -> float:
    """Mean of the piecewise-linear inverse-CDF sampler over ``quantiles`` (trapezoids)."""
    return float((quantiles[1:] + quantiles[:-1]).mean() / 2)


@dataclass(frozen=True, slots=True)
class StepTimeNoise:
    """Multiplicative step-time factors: ``sample(rng)`` has mean 1 (see module)."""

    quantiles: tuple[float, ...]
    """Factors at probabilities ``linspace(0, 1, len(quantiles))``, nondecreasing, > 0."""
    autocorrelation: float = 0.0
    """Coefficient of the AR(1) process behind consecutive draws, in [0, 1) (0: independent
    draws; see module)."""
    sequence: tuple[float, ...] = ()
    """Measured factors in step order, mean 1, replayed by `process` (see module); empty:
    none kept (the AR(1) process stands in)."""

    def __post_init__(self) -> None:
        rho = self.autocorrelation
        if not (isinstance(rho, (int, float)) and 0 <= rho < 1):
            raise ValueError(f"step noise autocorrelation must be in [0, 1), got {rho!r}")
        seq = tuple(float(x) for x in self.sequence)
        bad = next((x for x in seq if not 0 < x < math.inf), None)
        if bad is not None:
            raise ValueError(f"step noise sequence must hold finite factors > 0, got {bad!r}")
        object.__setattr__(self, "sequence", seq)
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
        """The noise of measured/predicted ``ratios`` (> 0, in step order), rescaled to mean
        1, with the autocorrelation of their order (`fit_autocorrelation`)."""
        r = np.asarray(ratios, dtype=np.float64)
        if r.size < 1 or not np.all(np.isfinite(r)) or np.any(r <= 0):
            raise ValueError(f"ratios must be a non-empty list of finite numbers > 0, got {r!r}")
        q = np.quantile(r, np.linspace(0.0, 1.0, num_quantiles))
        if q[-1] == q[0]:
            return cls((1.0,) * num_quantiles)
        kept = r[:MAX_SEQUENCE_STEPS]
        # Rounded: the profile stores them, and 4 digits are far below the steps' spread.
        sequence = tuple(np.round(kept / kept.mean(), 4).tolist())
        return cls(tuple(q / _sampler_mean(q)), fit_autocorrelation(r), sequence)

    @classmethod
    def none(cls) -> StepTimeNoise:
        """No noise: every sample is 1."""
        return cls((1.0, 1.0))

    def sample(self, rng: np.random.Generator) -> float:
        """One factor to multiply a predicted step time by, independent of earlier ones
        (`process` for draws with this noise's autocorrelation)."""
        return self.at(rng.random())

    def at(self, u: float) -> float:
        """The factor at probability ``u`` in [0, 1] (the inverse CDF)."""
        q = self.quantiles
        pos = u * (len(q) - 1)
        i = min(int(pos), len(q) - 2)
        return q[i] + (q[i + 1] - q[i]) * (pos - i)

    def process(self) -> StepTimeNoise | CorrelatedDraws | ReplayedDraws:
        """A sampler for one instance's consecutive steps (each instance has its own slow
        stretches): a replay of the measured sequence when there is one, else an AR(1)
        process, else (no autocorrelation) this noise itself."""
        if self.sequence:
            return ReplayedDraws(self.sequence)
        return self if self.autocorrelation == 0 else CorrelatedDraws(self)

    def mean(self) -> float:
        return _sampler_mean(np.asarray(self.quantiles))

    def to_list(self) -> list[float]:
        return list(self.quantiles)


class CorrelatedDraws:
    """Consecutive factors of one instance: z <- rho z + sqrt(1 - rho^2) e, factor =
    quantile table at Phi(z). The stationary z is standard normal, so each factor keeps the
    table's distribution (mean 1); the first draw starts from the stationary law."""

    __slots__ = ("noise", "rho", "scale", "z")

    def __init__(self, noise: StepTimeNoise) -> None:
        self.noise = noise
        self.rho = noise.autocorrelation
        self.scale = math.sqrt(1.0 - self.rho * self.rho)
        self.z: float | None = None

    def sample(self, rng: np.random.Generator) -> float:
        e = float(rng.standard_normal())
        self.z = e if self.z is None else self.rho * self.z + self.scale * e
        return self.noise.at(_NORMAL.cdf(self.z))


class ReplayedDraws:
    """Consecutive factors of one instance replayed from a measured sequence (stationary
    block bootstrap): the next measured factor, or with probability 1/``mean_block`` one at
    a uniformly random position (the first draw too); the sequence wraps around."""

    __slots__ = ("sequence", "jump", "pos")

    def __init__(
        self, sequence: Sequence[float], mean_block: int = REPLAY_MEAN_BLOCK_STEPS
    ) -> None:
        if not sequence:
            raise ValueError("ReplayedDraws needs a non-empty measured sequence")
        if mean_block < 1:
            raise ValueError(f"mean_block must be >= 1 step, got {mean_block!r}")
        self.sequence = sequence
        self.jump = 1.0 / mean_block
        self.pos: int | None = None

    def sample(self, rng: np.random.Generator) -> float:
        n = len(self.sequence)
        if self.pos is None or rng.random() < self.jump:
            self.pos = int(rng.integers(n))
        else:
            self.pos = (self.pos + 1) % n
        return self.sequence[self.pos]


def normal_scores(values: np.ndarray) -> np.ndarray:
    """Rank-based normal scores of ``values``: Phi^-1(rank / (n + 1)), in their order."""
    ranks = np.argsort(np.argsort(values, kind="stable"), kind="stable") + 1
    return np.array([_NORMAL.inv_cdf(r / (values.size + 1)) for r in ranks])


def block_mean_variance_ratio(rho: float, m: int) -> float:
    """Variance of the mean of m consecutive AR(1) values over that of m independent ones."""
    if rho == 0:
        return 1.0
    return (1 + rho) / (1 - rho) - 2 * rho * (1 - rho**m) / (m * (1 - rho) ** 2)


def fit_autocorrelation(ratios: np.ndarray, block: int = CORRELATION_BLOCK_STEPS) -> float:
    """The AR(1) coefficient whose means over ``block`` consecutive steps vary as much as
    those of ``ratios``' normal scores do (0 when fewer than 4 blocks were measured or the
    block means vary no more than independent draws')."""
    r = np.asarray(ratios, dtype=np.float64)
    num_blocks = r.size // block
    if num_blocks < 4 or np.all(r == r[0]):
        return 0.0
    z = normal_scores(r)[: num_blocks * block]
    means = z.reshape(num_blocks, block).mean(axis=1)
    target = block * float(means.var(ddof=1)) / float(z.var(ddof=1))
    if target <= 1.0:
        return 0.0
    lo, hi = 0.0, MAX_AUTOCORRELATION  # the ratio grows with rho: bisect
    if block_mean_variance_ratio(hi, block) <= target:
        return hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if block_mean_variance_ratio(mid, block) < target else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True, slots=True)
class KindNoise:
    """Step-time noise per step kind ("prefill", "decode", "mixed"): a step draws from its
    own kind's measured distribution (``fallback``, the noise of every step, for a kind the
    profile has none of). One noise for every kind lends one kind's tail to another: in a
    1P1D instance profile, prefills after an idle wait reached 3.5x the fit, its decodes
    2.1x; with one table the simulated decode steps drew from both."""

    by_kind: dict[str, StepTimeNoise]
    fallback: StepTimeNoise

    def for_kind(self, kind: str) -> StepTimeNoise:
        return self.by_kind.get(kind, self.fallback)

    def sample(self, rng: np.random.Generator, kind: str = "all") -> float:
        """One independent factor of a ``kind`` step (`process` for correlated draws)."""
        return self.for_kind(kind).sample(rng)

    def process(self) -> KindDraws:
        return KindDraws(self)


class KindDraws:
    """One instance's consecutive factors per step kind: each kind its own sampler
    (`StepTimeNoise.process`), made at its first step."""

    __slots__ = ("noise", "samplers")

    def __init__(self, noise: KindNoise) -> None:
        self.noise = noise
        self.samplers: dict[str, StepTimeNoise | CorrelatedDraws] = {}

    def sample(self, rng: np.random.Generator, kind: str = "all") -> float:
        sampler = self.samplers.get(kind)
        if sampler is None:
            sampler = self.samplers[kind] = self.noise.for_kind(kind).process()
        return sampler.sample(rng)
