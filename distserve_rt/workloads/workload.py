"""`Workload`: the prompt and output lengths of a set of requests.

Arrival times are not part of a workload: the same lengths are replayed at many rates
(`Workload.arrivals`), as the planner's rate search and `drt-run bench` do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np

from distserve_rt.workloads.arrivals import arrival_times
from distserve_rt.workloads.datasets import load_lengths, resolve_dataset


class LengthKind(str, Enum):
    FIXED = "fixed"
    UNIFORM = "uniform"
    LOGNORMAL = "lognormal"


@dataclass(frozen=True, slots=True)
class LengthDist:
    """A synthetic length distribution (tokens).

    ``fixed``: always ``mean``. ``uniform``: integers in ``[low, high]``. ``lognormal``: mean
    ``mean`` and standard deviation ``std`` of the lengths themselves (not of their log),
    rounded and clipped to ``[low, high]``.
    """

    kind: LengthKind
    mean: float = 0.0
    std: float = 0.0
    low: int = 1
    high: int = 1 << 20

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", LengthKind(self.kind))
        if not 1 <= self.low <= self.high:
            raise ValueError(f"need 1 <= low <= high, got low={self.low!r} high={self.high!r}")
        if self.kind is not LengthKind.UNIFORM and not self.mean >= 1:
            raise ValueError(f"mean must be >= 1 token for {self.kind.value}, got {self.mean!r}")
        if self.kind is LengthKind.LOGNORMAL and not self.std > 0:
            raise ValueError(f"std must be > 0 for lognormal, got {self.std!r}")

    def sample(self, num: int, rng: np.random.Generator) -> np.ndarray:
        """``num`` lengths, int64 ``[num]``."""
        if self.kind is LengthKind.FIXED:
            out = np.full(num, round(self.mean), dtype=np.int64)
        elif self.kind is LengthKind.UNIFORM:
            out = rng.integers(self.low, self.high + 1, num)
        else:
            # Moments of the lognormal from the mean/std of the lengths.
            sigma2 = math.log1p((self.std / self.mean) ** 2)
            mu = math.log(self.mean) - sigma2 / 2
            out = np.rint(rng.lognormal(mu, math.sqrt(sigma2), num)).astype(np.int64)
        return np.clip(out, self.low, self.high).astype(np.int64)


@dataclass(frozen=True, eq=False)
class Workload:
    """Lengths of ``num_requests`` requests (tokens, int64 arrays)."""

    name: str
    prompt_lens: np.ndarray  # [num_requests] prompt tokens
    output_lens: np.ndarray  # [num_requests] output tokens, >= 1 (the first comes from prefill)

    def __post_init__(self) -> None:
        prompt = np.asarray(self.prompt_lens, dtype=np.int64)
        output = np.asarray(self.output_lens, dtype=np.int64)
        if prompt.ndim != 1 or prompt.shape != output.shape or prompt.size == 0:
            raise ValueError(
                f"prompt_lens and output_lens must be non-empty 1-D arrays of one length, "
                f"got {prompt.shape} and {output.shape}"
            )
        if prompt.min() < 1 or output.min() < 1:
            raise ValueError(
                f"lengths must be >= 1 token, got min prompt {prompt.min()} "
                f"and min output {output.min()}"
            )
        object.__setattr__(self, "prompt_lens", prompt)
        object.__setattr__(self, "output_lens", output)

    @property
    def num_requests(self) -> int:
        return int(self.prompt_lens.size)

    @classmethod
    def from_dataset(cls, name: str) -> Workload:
        """All rows of a named dataset ("sharegpt"/"chat", "humaneval"/"code", ...)."""
        prompt, output = load_lengths(name)
        return cls(resolve_dataset(name), prompt, output)

    @classmethod
    def synthetic(
        cls, num_requests: int, prompt: LengthDist, output: LengthDist, *, seed: int = 0
    ) -> Workload:
        """``num_requests`` requests with lengths drawn from ``prompt`` and ``output``."""
        if num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {num_requests!r}")
        rng = np.random.default_rng(seed)
        name = f"synthetic({prompt.kind.value},{output.kind.value})"
        return cls(name, prompt.sample(num_requests, rng), output.sample(num_requests, rng))

    def sample(self, num_requests: int, *, seed: int = 0) -> Workload:
        """``num_requests`` rows drawn with replacement (seeded)."""
        if num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {num_requests!r}")
        idx = np.random.default_rng(seed).integers(0, self.num_requests, num_requests)
        return Workload(self.name, self.prompt_lens[idx], self.output_lens[idx])

    def scaled(self, factor: float) -> Workload:
        """Every length times ``factor``, rounded, at least 1 token (a paper dataset shrunk
        to a tiny model's speed keeps its prompt/output mix and its spread)."""
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise ValueError(f"factor must be a number > 0, got {factor!r}")
        if factor == 1:
            return self

        def scale(lens: np.ndarray) -> np.ndarray:
            return np.maximum(1, np.rint(lens * factor)).astype(np.int64)

        name = f"{self.name}x{factor:g}"
        return Workload(name, scale(self.prompt_lens), scale(self.output_lens))

    def arrivals(self, rate: float, *, cv: float = 1.0, seed: int = 0) -> np.ndarray:
        """Arrival times (s, float64 ``[num_requests]``) at ``rate`` req/s; see `arrival_times`."""
        return arrival_times(self.num_requests, rate, cv=cv, seed=seed)

    def max_seq_len(self) -> int:
        return int((self.prompt_lens + self.output_lens).max())

    def describe(self) -> dict[str, float]:
        return {
            "num_requests": self.num_requests,
            "prompt_mean": float(self.prompt_lens.mean()),
            "output_mean": float(self.output_lens.mean()),
        }
