"""The workload `drt-run profile` runs through the real engine to record its steps.

Requests arrive per *step*, not per wall-clock second: the arrivals (and so the batches the
scheduler forms) are a function of the seed alone, so a second repeat of the workload
executes the very same batch shapes and each shape gets a median over repeats. The workload
goes through phases (`PHASES`): first requests that want one token only (every step is
prefill-only, whatever the policy: a request finishes with its prefill), then arrival rates
from an almost idle engine (small decode steps) to a saturated one (large decode batches
and, under chunked prefill, mixed steps). Prompt and output lengths are log-uniform, so the
fit sees the whole range on the log scale its relative error weighs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from distserve_rt.engine.llm_engine import LLMEngine
from distserve_rt.engine.step_log import StepRecord
from distserve_rt.sampling_params import SamplingParams

PHASES = ((1.5, True), (0.05, False), (0.2, False), (0.5, False), (1.5, False))
"""(mean arrivals per engine step (Poisson), one output token only) of each phase."""


@dataclass(frozen=True, slots=True)
class EngineWorkload:
    """A step-driven synthetic workload (see module)."""

    num_steps: int = 600
    """Engine steps with arrivals per repeat (then the engine drains)."""
    max_prompt_len: int = 1024
    max_output_len: int = 128
    max_queued: int = 64
    """No arrival while this many requests are unfinished (the queue stays bounded)."""
    seed: int = 0
    lengths: str = "log-uniform"
    """Prompt and output length distribution: "log-uniform" (the whole range, for a
    general profile) or "uniform" (a workload's own, e.g. sim_vs_runtime's: the fit then
    sees the contexts the served steps have; a decode step's cost per context token is
    otherwise extrapolated from short ones)."""
    min_prompt_len: int = 4
    min_output_len: int = 2

    def __post_init__(self) -> None:
        for name in ("num_steps", "max_prompt_len", "max_output_len", "max_queued"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.lengths not in _DRAW:
            raise ValueError(f"lengths must be one of {sorted(_DRAW)}, got {self.lengths!r}")
        if not 1 <= self.min_prompt_len <= self.max_prompt_len:
            raise ValueError(
                f"min_prompt_len must be in [1, max_prompt_len={self.max_prompt_len}], got "
                f"{self.min_prompt_len!r}"
            )
        if not 2 <= self.min_output_len <= self.max_output_len:
            raise ValueError(
                f"min_output_len must be in [2, max_output_len={self.max_output_len}], got "
                f"{self.min_output_len!r}"
            )
        if self.num_steps < len(PHASES):
            raise ValueError(
                f"num_steps must be >= {len(PHASES)} (one per phase), got {self.num_steps!r}"
            )

    def arrivals(self, vocab_size: int) -> list[list[tuple[list[int], int]]]:
        """Per step, the (prompt token ids, max_tokens) of the requests arriving at it."""
        rng = np.random.default_rng(self.seed)
        draw = _DRAW[self.lengths]
        steps = []
        for i in range(self.num_steps):
            rate, prefill_only = PHASES[i * len(PHASES) // self.num_steps]
            step = []
            for _ in range(rng.poisson(rate)):
                prompt_len = draw(rng, self.min_prompt_len, self.max_prompt_len)
                output_len = (
                    1 if prefill_only else draw(rng, self.min_output_len, self.max_output_len)
                )
                step.append((rng.integers(3, vocab_size, prompt_len).tolist(), output_len))
            steps.append(step)
        return steps


def _log_uniform(rng: np.random.Generator, low: int, high: int) -> int:
    return int(np.exp(rng.uniform(np.log(low), np.log(high + 1)))) if high > low else low


def _uniform(rng: np.random.Generator, low: int, high: int) -> int:
    return int(rng.integers(low, high + 1))


_DRAW = {"log-uniform": _log_uniform, "uniform": _uniform}


def record_engine_steps(
    engine: LLMEngine,
    workload: EngineWorkload,
    *,
    repeats: int = 1,
    warmup_steps: int = 20,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> list[StepRecord]:
    """Runs ``workload`` ``repeats`` times through ``engine`` (after ``warmup_steps``
    unrecorded steps of it) and returns every executed step. ``progress`` wraps the step
    iterator (a tqdm)."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if engine.config.enable_prefix_caching:
        # Repeats of the same prompts would hit the cache: other batches, shorter prefills.
        raise ValueError(
            "record_engine_steps: the engine has enable_prefix_caching=True; build it with "
            "enable_prefix_caching=False so that every repeat computes the same batches"
        )
    arrivals = workload.arrivals(engine.model_config.vocab_size)
    _run(engine, arrivals[:warmup_steps], workload.max_queued, "warmup")
    engine.disable_step_log()  # the warm-up stays out of the log
    log = engine.enable_step_log(1 << 24)  # the whole run: bounded by the workload itself
    steps: Iterable = range(repeats * workload.num_steps)
    bar = iter(progress(steps) if progress else steps)
    for r in range(repeats):
        _run(engine, arrivals, workload.max_queued, f"r{r}", lambda: next(bar, None))
    records = log.records()
    engine.disable_step_log()
    return records


def _run(engine, arrivals, max_queued: int, tag: str, tick=lambda: None) -> None:
    for i, step in enumerate(arrivals):
        for j, (prompt, max_tokens) in enumerate(step):
            if engine.num_unfinished_requests < max_queued:
                params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
                engine.add_request(f"{tag}-{i}-{j}", prompt, params)
        engine.step()
        tick()
    while engine.has_unfinished_requests():
        engine.step()
