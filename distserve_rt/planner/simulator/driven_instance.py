"""What the scheduler-driven simulators share: one instance of the runtime's `core`
scheduler on a simulated clock, the latency model standing in for the model runner.

The runtime's policies (admission on the prompt above the watermark, token budgets,
``max_num_seqs``, preemption by recompute, back-pressure of KV awaiting migration) are not
re-implemented here: the simulators build the very `BlockManager` and scheduler classes the
engine builds (`engine/llm_engine.py`, `engine/disagg/instance.py`) and only decide *how
long* each step the scheduler chose takes. That makes them slower than the analytic fast
simulators (one Python step per engine step, not a closed-form jump over many), and exact
where the fast ones approximate (memory pressure, preemption).

Requests have forced output lengths, as in the paper's benchmarks: ``max_tokens`` = the
output length with ``ignore_eos``, so the runtime's `StopChecker` stops them with LENGTH.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import numpy as np

from distserve_rt.config.engine import EngineConfig
from distserve_rt.config.scheduler import SchedulerConfig
from distserve_rt.core.block_manager import BlockManager
from distserve_rt.core.request import Request
from distserve_rt.core.scheduler.interface import Scheduler, SchedulerOutput
from distserve_rt.core.stop_checker import StopChecker
from distserve_rt.planner.latency_model import LatencyModel
from distserve_rt.planner.simulator.spec import SimInstanceSpec
from distserve_rt.sampling_params import SamplingParams

# The engine's defaults, read from `EngineConfig` so the two cannot drift apart.
_ENGINE_FIELDS = EngineConfig.__dataclass_fields__
DEFAULT_BLOCK_SIZE: int = _ENGINE_FIELDS["block_size"].default
DEFAULT_WATERMARK: float = _ENGINE_FIELDS["watermark"].default
_TOKEN = 0
"""Every simulated token's id: with ignore_eos and no stop ids, only the lengths stop."""


class StepNoise(Protocol):
    """Step-time jitter: a multiplicative factor per step (mean about 1), e.g. drawn from the
    step times a profile measured around its fit. A noise whose draws depend on earlier
    ones (`step_noise.StepTimeNoise` with an autocorrelation) also has ``process()``, which
    returns a fresh sampler: each instance's clock takes its own."""

    def sample(self, rng: np.random.Generator) -> float: ...


# A noise with ``for_kind`` (`step_noise.KindNoise`) is sampled as ``sample(rng, kind)``, the
# step's kind ("prefill", "decode", "mixed"): each kind draws from its own distribution.


def check_pp1(spec: SimInstanceSpec, role: str) -> None:
    if spec.parallelism.pp_size != 1:
        raise NotImplementedError(
            f"the scheduler-driven simulator supports pp=1 only, got {role} "
            f"{spec.parallelism}: a PP instance runs pp_size virtual engines with batches in "
            f"flight between stages, which this simulator does not model yet; use the fast "
            f"simulator (ColocatedSimulator / DisaggregatedSimulator) for PP"
        )


def make_scheduler_config(spec: SimInstanceSpec, max_model_len: int) -> SchedulerConfig:
    """The instance's limits as `EngineConfig.scheduler_config` resolves them."""
    return SchedulerConfig(
        max_num_seqs=spec.max_num_seqs,
        max_num_batched_tokens=spec.max_batch_tokens,
        max_model_len=max_model_len,
    )


def make_block_manager(
    spec: SimInstanceSpec, block_size: int, watermark: float, *, prefix_caching: bool = False
) -> BlockManager:
    """The instance's pool as the engine sizes it: whole blocks of its KV capacity.

    ``prefix_caching`` only where the requests carry real token ids (`run_conversations`):
    the runtime's own cache (hashes, LRU eviction, capacity = the pool) then models hits."""
    num_blocks = spec.kv_capacity_tokens // block_size
    if num_blocks < 1:
        raise ValueError(
            f"kv_capacity_tokens ({spec.kv_capacity_tokens}) must hold at least one block of "
            f"block_size={block_size} tokens"
        )
    # Off unless asked for: the length-only runs give every token the same id, so a cache
    # would hit on every prompt (see tests/planner/test_driven_sim_prefix_cache.py).
    return BlockManager(num_blocks, block_size, watermark, enable_prefix_caching=prefix_caching)


def make_request(
    index: int,
    prompt_len: int,
    output_len: int,
    arrival: float,
    max_model_len: int,
    prompt_token_ids: list[int] | None = None,
) -> Request:
    """Request ``index`` (its id and seq_id) as the engine builds it: greedy, a forced
    output length, the runtime's stop rules. Its prompt is ``prompt_token_ids`` when given
    (then of ``prompt_len`` tokens), else ``prompt_len`` copies of one id."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    ids = [_TOKEN] * prompt_len if prompt_token_ids is None else prompt_token_ids
    request = Request(str(index), index, ids, params, arrival, max_model_len)
    request.stop_checker = StopChecker(
        params,
        eos_token_id=None,
        num_prompt_tokens=prompt_len,
        max_model_len=max_model_len,
        detokenizer=None,
    )
    return request


def migrated_copy(request: Request, max_model_len: int) -> Request:
    """The decode instance's `Request` for a finished prefill (`Instance.make_request` of a
    Migrate): prompt + the first token, KV for all but the last token, the token rules."""
    params = request.sampling_params
    copy = Request(
        request.request_id,
        request.seq_id,
        request.prompt_token_ids,
        params,
        request.arrival_time,
        max_model_len,
    )
    copy.token_ids.extend(request.output_token_ids)
    copy.num_computed_tokens = copy.num_tokens - 1
    copy.stop_checker = StopChecker(
        params,
        eos_token_id=None,
        num_prompt_tokens=request.num_prompt_tokens,
        max_model_len=max_model_len,
        detokenizer=None,
        num_output_tokens=request.num_output_tokens,
        apply_stop_strings=False,
    )
    return copy


class StepClock:
    """Step times of one instance: the latency model on the batch's shape, times the noise,
    plus the instance's loop between steps (``loop_s``), plus ``wake(idle_s)`` for a step
    that starts after the instance idled ``idle_s``
    (a thread pool woken from sleep runs its first step slower: measured, not fitted)."""

    __slots__ = ("latency", "noise", "rng", "wake", "loop_s", "last_end", "by_kind")

    def __init__(
        self,
        latency: LatencyModel,
        noise: StepNoise | None,
        rng: np.random.Generator,
        wake: Callable[[float], float] | None = None,
        loop_s: float = 0.0,
    ) -> None:
        self.latency = latency
        self.loop_s = loop_s
        """The instance's loop between two steps (s), added to each step (`ProcessHops`)."""
        # One sampler per instance: its slow stretches are its own (see StepNoise).
        process = getattr(noise, "process", None)
        self.noise = process() if process is not None else noise
        self.by_kind = getattr(noise, "for_kind", None) is not None
        """The noise draws per step kind (`step_noise.KindNoise`): ``sample(rng, kind)``."""
        self.rng = rng
        self.wake = wake
        self.last_end = -math.inf
        """End of this instance's previous step (s); the first step follows a long idle."""

    def seconds(self, out: SchedulerOutput, now: float | None = None) -> float:
        """How long the step `out` starting at ``now`` takes (s). Prefill chunks cost Σ new
        tokens and Σ chunk·(prefix + chunk) (attention over the prefix too); decodes B and
        Σ seq_lens (each including its new token). ``now`` None: no wake-up cost."""
        t = self._model_s(out)
        if self.noise is not None:
            if self.by_kind:
                factor = self.noise.sample(self.rng, _kind(out))
            else:
                factor = self.noise.sample(self.rng)
            if not (factor > 0 and math.isfinite(factor)):
                raise ValueError(f"noise.sample must return a finite factor > 0, got {factor!r}")
            t *= factor
        t += self.loop_s
        if self.wake is not None and now is not None:
            t += self.wake(now - self.last_end)
            self.last_end = now + t
        return t

    def _model_s(self, out: SchedulerOutput) -> float:
        lat = self.latency
        num_decodes = len(out.decodes)
        if out.prefills:
            num_tokens = out.num_prefill_tokens
            sum_sq = 0
            for p in out.prefills:
                sum_sq += p.num_new_tokens * (p.prefix_len + p.num_new_tokens)
            if num_decodes:
                num_ctx = int(out.decode_seq_lens.sum())
                return lat.mixed_s(num_tokens, sum_sq, num_decodes, num_ctx)
            return lat.prefill_s(num_tokens, sum_sq)
        return lat.decode_s(num_decodes, int(out.decode_seq_lens.sum()))


def _kind(out: SchedulerOutput) -> str:
    """The step's kind as the engine's step log names it (`engine.step_log.StepShape`)."""
    if out.prefills:
        return "mixed" if out.decodes else "prefill"
    return "decode"


def next_batch(sched: Scheduler, now: float) -> tuple[SchedulerOutput, list[Request], int]:
    """`sched.schedule(now)` as the engine's loop calls it: again while a call returns no
    batch, until two calls in a row report nothing. A call may preempt every running
    request (the victims are admitted by the next call) or reject one (reported by the
    next call), so one empty batch does not mean the instance is idle.

    Returns the batch (empty when idle), every request reported finished (rejected or
    aborted) by the calls, and the number of preemptions."""
    finished: list[Request] = []
    num_preempted = 0
    num_quiet = 0
    while True:
        out = sched.schedule(now)
        finished += out.finished
        num_preempted += len(out.preempted)
        if not out.is_empty:
            return out, finished, num_preempted
        if out.finished or out.preempted:
            num_quiet = 0
        else:
            num_quiet += 1
            if num_quiet == 2:
                return out, finished, num_preempted


def sampled_tokens(out: SchedulerOutput) -> list[int]:
    """One token per row that samples (the executor's output)."""
    return [_TOKEN] * len(out.sampling_requests())


def check_lengths(arrival, prompt_lens, output_lens) -> tuple[np.ndarray, list[int], list[int]]:
    arrival = np.asarray(arrival, dtype=np.float64)
    prompt = [int(x) for x in prompt_lens]
    out = [int(x) for x in output_lens]
    if not (arrival.size == len(prompt) == len(out)):
        raise ValueError(
            f"arrival, prompt_lens and output_lens must have one length, got "
            f"{arrival.size}, {len(prompt)}, {len(out)}"
        )
    if arrival.size and np.any(np.diff(arrival) < 0):
        raise ValueError("arrival must be non-decreasing (requests in arrival order)")
    for name, values in (("prompt_lens", prompt), ("output_lens", out)):
        bad = next((x for x in values if x < 1), None)
        if bad is not None:
            raise ValueError(f"{name} must all be >= 1, got {bad}")
    return arrival, prompt, out


def resolve_max_model_len(max_model_len: int | None, prompt: list[int], out: list[int]) -> int:
    """The context length: the longest request unless given (shorter would cut outputs)."""
    longest = max((p + o for p, o in zip(prompt, out, strict=True)), default=2)
    if max_model_len is None:
        return longest
    if max_model_len < longest:
        raise ValueError(
            f"max_model_len ({max_model_len}) must be >= the longest request's prompt + output "
            f"({longest}): a shorter context would stop outputs early"
        )
    return max_model_len
