"""The profiler: measure step times, fit the latency model, save it.

Two sources of step times:

* **the running engine** (`fit_engine_profile`, `drt-run profile`'s default): the steps an
  `LLMEngine` recorded while serving a synthetic workload (`engine.step_log`), whole steps
  with the host's share, chunked prefill's mixed steps included; fitted by
  `profile_fit.fit_engine_steps` (overhead, per-kind forms, held-out error, step noise).
  This is what the simulator must reproduce;
* **isolated steps** over a grid (``--isolated``), below: the pure step cost, no host.

* **Grid** (`ProfileGrid`): prefill batches of ``batch_size`` equal prompts of
  ``prompt_len`` tokens, with ``batch_size · prompt_len <= max_tokens`` (L_m, the prefill
  token budget); decode steps of ``batch_size`` requests at context ``ctx_len``. Lengths are
  powers of two, so the grid spans the range evenly on the log scale the relative-error fit
  weighs.
* **Measure** (`measure`): one `StepTimer` call per grid point (median of repeats inside).
* **Fit** (`fit_profile`): DistServe's form (`profile_fit.fit_fitted_form`), optionally the
  paper's analytic form too, into a `ProfileSet` that `drt-run simulate/plan --profile` load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from distserve_rt.models.config import ModelConfig
from distserve_rt.planner.latency_model import FittedCoefficients
from distserve_rt.planner.profile_fit import (
    fit_analytic_form,
    fit_engine_steps,
    fit_fitted_form,
)
from distserve_rt.planner.profiles import ProfileEntry, ProfileSet
from distserve_rt.planner.step_timer import StepTimer

MIN_LEN = 16
"""Shortest prompt / context of the grid (tokens)."""


def _powers_of_two(low: int, high: int) -> list[int]:
    out, x = [], low
    while x <= high:
        out.append(x)
        x *= 2
    return out


@dataclass(frozen=True, slots=True)
class ProfileGrid:
    """Which batches the profiler measures."""

    max_batch_size: int = 16
    """Largest batch (requests) of both grids."""
    max_tokens: int = 2048
    """Prefill: most prompt tokens in one batch (L_m); the longest prompt too."""
    max_context_len: int = 1024
    """Decode: the longest context (tokens of KV before the step)."""
    decode_ctx_step: int = 4
    """Decode contexts grow by this factor (MIN_LEN, MIN_LEN·step, ...; max_context_len last)."""

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_tokens", "max_context_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("max_tokens", "max_context_len"):
            if getattr(self, name) < MIN_LEN:
                raise ValueError(f"{name} must be >= {MIN_LEN} tokens, got {getattr(self, name)!r}")
        if not isinstance(self.decode_ctx_step, int) or self.decode_ctx_step < 2:
            raise ValueError(f"decode_ctx_step must be an int >= 2, got {self.decode_ctx_step!r}")

    def batch_sizes(self) -> list[int]:
        sizes = _powers_of_two(1, self.max_batch_size)
        if sizes[-1] != self.max_batch_size:
            sizes.append(self.max_batch_size)
        return sizes

    def prefill_points(self) -> list[tuple[int, int]]:
        """``(batch_size, prompt_len)`` with ``batch_size · prompt_len <= max_tokens``."""
        lens = _powers_of_two(MIN_LEN, self.max_tokens)
        return [(b, n) for n in lens for b in self.batch_sizes() if b * n <= self.max_tokens]

    def decode_points(self) -> list[tuple[int, int]]:
        """``(batch_size, ctx_len)`` over every batch size and context length."""
        ctxs, x = [], MIN_LEN
        while x < self.max_context_len:
            ctxs.append(x)
            x *= self.decode_ctx_step
        ctxs.append(self.max_context_len)
        return [(b, c) for c in ctxs for b in self.batch_sizes()]

    @property
    def max_kv_tokens(self) -> int:
        """KV tokens the largest step holds (the pool the timer needs)."""
        return max(self.max_tokens, self.max_batch_size * (self.max_context_len + 1))

    def to_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class ProfileSamples:
    """Measured step times (ms) in `profile_fit`'s sample shapes."""

    prefill: list[tuple[list[int], float]] = field(default_factory=list)
    """``(prompt_lens, time_ms)`` per prefill batch."""
    decode: list[tuple[list[int], float]] = field(default_factory=list)
    """``(ctx_lens, time_ms)`` per decode step (contexts before the step)."""

    def to_dict(self) -> dict[str, list]:
        def rows(samples):
            return [{"batch_size": len(x), "len": x[0], "ms": t} for x, t in samples]

        return {"prefill": rows(self.prefill), "decode": rows(self.decode)}


def measure(
    grid: ProfileGrid,
    timer: StepTimer,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> ProfileSamples:
    """Times every grid point with ``timer``. ``progress`` wraps the point list (a tqdm)."""
    points = [("prefill", b, n) for b, n in grid.prefill_points()]
    points += [("decode", b, c) for b, c in grid.decode_points()]
    samples = ProfileSamples()
    for phase, batch, length in progress(points) if progress else points:
        lens = [length] * batch
        if phase == "prefill":
            samples.prefill.append((lens, timer.prefill_ms(lens)))
        else:
            samples.decode.append((lens, timer.decode_ms(lens)))
    return samples


def fit_profile(
    samples: ProfileSamples,
    model: ModelConfig,
    *,
    hardware: str,
    tp: int = 1,
    decode_threshold: int = 95,
    analytic: bool = False,
    source: str = "",
    measurement: dict[str, object] | None = None,
) -> ProfileSet:
    """A one-entry `ProfileSet` for ``(model.name, tp)`` fitted from ``samples``.

    ``analytic``: also fit the paper's C1..C6 (stored in the profile's ``analytic`` section;
    from one model they are only as general as that model's shapes allow).
    """
    coeffs, errors = fit_fitted_form(samples.prefill, samples.decode, decode_threshold)
    profile = ProfileSet(
        hardware,
        [ProfileEntry(model.name, tp, coeffs, errors)],
        source,
        measurement=dict(measurement or {}),
    )
    if analytic:
        profile.analytic, profile.analytic_fit_error = fit_analytic_form(
            [(model, tp, lens, t) for lens, t in samples.prefill],
            [(model, tp, lens, t) for lens, t in samples.decode],
        )
    return profile


def fit_engine_profile(
    records,
    model: ModelConfig,
    *,
    hardware: str,
    tp: int = 1,
    decode_threshold: int = 95,
    held_out: float = 0.2,
    source: str = "",
    measurement: dict[str, object] | None = None,
    fallback: FittedCoefficients | None = None,
) -> ProfileSet:
    """A one-entry `ProfileSet` for ``(model.name, tp)`` fitted from the engine's step
    ``records`` (`engine.step_log.StepRecord`s), with held-out error and step noise.
    ``fallback``: coefficients for step kinds the records have too few shapes of
    (`fit_engine_steps`); the groups taken from it are in ``measurement["borrowed"]``."""
    fit = fit_engine_steps(records, decode_threshold, held_out, fallback=fallback)
    entry = ProfileEntry(
        model.name, tp, fit.coefficients, fit.fit_error, fit.held_out_error, fit.noise
    )
    measurement = dict(measurement or {})
    if fit.borrowed:
        measurement["borrowed"] = list(fit.borrowed)
    return ProfileSet(hardware, [entry], source, measurement=measurement)
