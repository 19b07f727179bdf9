"""The machine's drift: a fixed probe (one prefill, one decode batch) timed before each run
and compared with the same probe when the profile was measured. A shared machine's steps
slow down and speed up between runs a minute apart; the ratio says by how much, and
`ScaledLatencyModel` applies it, so the report can show the simulator with the profile as
measured (a gap from the model) and rescaled to the machine of the moment (a gap left after
the machine's drift is taken out)."""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from distserve_rt.planner.latency_model import LatencyModel
from distserve_rt.planner.step_timer import StepTimer


@dataclass(frozen=True, slots=True)
class ProbeTimes:
    """Median ms of the probe's prefill and decode steps."""

    prefill_ms: float
    decode_ms: float

    def ratio(self, reference: ProbeTimes) -> ProbeTimes:
        """These times over ``reference``'s (> 1: the machine is slower now)."""
        return ProbeTimes(
            self.prefill_ms / reference.prefill_ms, self.decode_ms / reference.decode_ms
        )

    def to_dict(self) -> dict[str, float]:
        return {"prefill_ms": self.prefill_ms, "decode_ms": self.decode_ms}


@dataclass(frozen=True)
class DriftProbe:
    """One prefill of ``prefill_len`` tokens and one decode step of ``decode_batch``
    requests holding ``decode_ctx`` tokens each: shapes in the middle of the workload's, so
    the ratio is that of the steps the runs take."""

    prefill_len: int
    decode_batch: int
    decode_ctx: int

    def __post_init__(self) -> None:
        for key in ("prefill_len", "decode_batch", "decode_ctx"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")

    def measure(
        self,
        timer: StepTimer,
        prefill_cores: Collection[int] | None = None,
        decode_cores: Collection[int] | None = None,
    ) -> ProbeTimes:
        """Times the probe with ``timer`` (its repeats set the median's sample count).
        ``*_cores``: run that half pinned to these cores, the ones the instance of that phase
        is pinned to, so a core another process keeps busy shows in the ratio (pinning moves
        the calling thread only: run the probe with one thread then)."""
        with pinned(prefill_cores):
            prefill_ms = timer.prefill_ms([self.prefill_len])
        with pinned(decode_cores):
            decode_ms = timer.decode_ms([self.decode_ctx] * self.decode_batch)
        return ProbeTimes(prefill_ms, decode_ms)

    def predict(self, latency: LatencyModel) -> ProbeTimes:
        """The probe as ``latency`` times it: the reference when the profile carries no
        probe of its own (then the ratio also holds the fit's error at the probe)."""
        ctx = self.decode_batch * (self.decode_ctx + 1)
        return ProbeTimes(
            1e3 * latency.prefill_s(self.prefill_len, self.prefill_len**2),
            1e3 * latency.decode_s(self.decode_batch, ctx),
        )

    def to_dict(self) -> dict[str, int]:
        return {
            "prefill_len": self.prefill_len,
            "decode_batch": self.decode_batch,
            "decode_ctx": self.decode_ctx,
        }


@contextmanager
def pinned(cores: Collection[int] | None) -> Iterator[None]:
    """The calling thread on ``cores`` for the block (None: left as it is)."""
    if cores is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class ScaledLatencyModel(LatencyModel):
    """``inner``'s step times times the drift ratios: prefill steps by ``prefill_scale``,
    decode steps by ``decode_scale``; a chunked-prefill mixed step by ``mixed_scale``, which
    defaults to ``prefill_scale`` (a mixed step's cost is mostly the prefill tokens' GEMMs).
    Other attributes are ``inner``'s."""

    def __init__(
        self,
        inner: LatencyModel,
        prefill_scale: float,
        decode_scale: float,
        mixed_scale: float | None = None,
    ) -> None:
        mixed_scale = prefill_scale if mixed_scale is None else mixed_scale
        scales = (
            ("prefill_scale", prefill_scale),
            ("decode_scale", decode_scale),
            ("mixed_scale", mixed_scale),
        )
        for key, value in scales:
            if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise ValueError(f"{key} must be a positive finite number, got {value!r}")
        self.inner = inner
        self.prefill_scale = float(prefill_scale)
        self.decode_scale = float(decode_scale)
        self.mixed_scale = float(mixed_scale)
        self.tp = inner.tp

    def __getattr__(self, name: str):
        if name == "inner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def prefill_s(self, num_tokens: int, sum_sq_lens: int) -> float:
        return self.prefill_scale * self.inner.prefill_s(num_tokens, sum_sq_lens)

    def decode_affine(self, batch_size: int) -> tuple[float, float]:
        alpha, beta = self.inner.decode_affine(batch_size)
        return self.decode_scale * alpha, self.decode_scale * beta

    def decode_s(self, batch_size: int, num_ctx_tokens: int) -> float:
        return self.decode_scale * self.inner.decode_s(batch_size, num_ctx_tokens)

    def mixed_s(
        self, num_prefill_tokens: int, prefill_sum_sq: int, batch_size: int, num_ctx_tokens: int
    ) -> float:
        if num_prefill_tokens == 0:
            return self.decode_s(batch_size, num_ctx_tokens)
        inner = self.inner.mixed_s(num_prefill_tokens, prefill_sum_sq, batch_size, num_ctx_tokens)
        return self.mixed_scale * inner

    @classmethod
    def from_ratio(cls, inner: LatencyModel, ratio: ProbeTimes) -> ScaledLatencyModel:
        return cls(inner, ratio.prefill_ms, ratio.decode_ms)

    @classmethod
    def from_step_ratios(
        cls, inner: LatencyModel, ratios: dict[str, float]
    ) -> ScaledLatencyModel | None:
        """``inner`` at the speed a served run's steps had (`steps.step_time_ratios`'
        ``step_ratio_{kind}``; a kind the run did not take keeps its scale of 1); None when
        the run logged no steps (a disaggregated engine's instances keep their own)."""
        scale = {k: ratios.get(f"step_ratio_{k}") for k in ("prefill", "decode", "mixed")}
        if all(v is None for v in scale.values()):
            return None
        return cls(
            inner,
            scale["prefill"] or 1.0,
            scale["decode"] or 1.0,
            scale["mixed"] or scale["prefill"] or 1.0,
        )
