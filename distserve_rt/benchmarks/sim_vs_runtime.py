"""Simulator vs runtime: the same requests at the same arrival times, simulated with a
measured latency profile and served by the real engine; SLO attainment compared.

A gap between the two measures the latency model (and the host overheads it leaves out),
provided both sides run the same policy: the simulator's colocated policies mirror the
runtime's schedulers (`planner.simulator.colocated`). Each side is a `Target`: adding the
disaggregated runtime is one more `Target` whose ``simulate`` builds a `DisaggSpec` and
whose ``replay`` drives that runtime with the same `replay` loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from distserve_rt.config import EngineConfig
from distserve_rt.engine.llm_engine import LLMEngine
from distserve_rt.metrics.slo import SLO, attainment
from distserve_rt.planner.latency_model import LatencyModel
from distserve_rt.planner.simulator import ColocatedPolicy, ColocatedSimulator, SimInstanceSpec
from distserve_rt.sampling_params import SamplingParams
from distserve_rt.workloads.workload import Workload


@dataclass(frozen=True)
class RunLatencies:
    """Per-request latencies of one run (s, float64 ``[num_requests]``; inf = failed)."""

    ttft: np.ndarray
    tpot: np.ndarray
    duration_s: float
    """First arrival to last finish."""
    extra: dict[str, float]
    """Side measurements (runtime: steps, mean host overhead per step)."""

    def row(self, slo: SLO) -> dict[str, float]:
        att = attainment(self.ttft, self.tpot, slo)
        ok = np.isfinite(self.ttft) & np.isfinite(self.tpot)
        return {
            "attainment": att.joint,
            "attainment_ttft": att.ttft,
            "attainment_tpot": att.tpot,
            "mean_ttft_s": float(self.ttft[ok].mean()) if ok.any() else float("inf"),
            "mean_tpot_s": float(self.tpot[ok].mean()) if ok.any() else float("inf"),
            "num_failed": int((~ok).sum()),
            "duration_s": self.duration_s,
            **self.extra,
        }


@dataclass(frozen=True)
class ColocatedSetup:
    """One colocated instance, as the engine and the simulator both see it."""

    policy: ColocatedPolicy
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    kv_capacity_tokens: int
    """KV the engine's pool holds (the simulator reserves prompt + output of it)."""
    model: str = "dummy:llama-tiny"
    block_size: int = 16

    def engine_config(self, bytes_per_token: int) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            policy=self.policy.value,
            block_size=self.block_size,
            kv_cache_memory_bytes=self.kv_capacity_tokens * bytes_per_token,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            log_stats_interval_s=0.0,
        )

    def instance_spec(self, latency: LatencyModel) -> SimInstanceSpec:
        return SimInstanceSpec(
            latency,
            self.kv_capacity_tokens,
            max_batch_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs,
        )


def simulate_colocated(
    setup: ColocatedSetup, latency: LatencyModel, arrival: np.ndarray, workload: Workload
) -> RunLatencies:
    result = ColocatedSimulator(setup.instance_spec(latency), setup.policy).run(
        arrival, workload.prompt_lens, workload.output_lens
    )
    finish = result.finish[np.isfinite(result.finish)]
    end = float(finish.max()) if finish.size else float(arrival.max())
    return RunLatencies(result.ttft, result.tpot, end - float(arrival.min()), {})


class _TimedExecutor:
    """Wraps an executor to sum the time spent executing steps (the rest of a step is the
    host's scheduling and postprocessing, which the profile leaves out)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.execute_s = 0.0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    # The engine submits with execute_async and collects with wait (virtual engines); both
    # are timed, or the executor's time would be counted as host overhead.
    def execute(self, scheduler_output):
        return self._timed(self.inner.execute, scheduler_output)

    def execute_async(self, scheduler_output, block_offset: int = 0):
        return self._timed(self.inner.execute_async, scheduler_output, block_offset)

    def wait(self, handle):
        return self._timed(self.inner.wait, handle)

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.execute_s += time.perf_counter() - t0


def replay(
    engine: LLMEngine,
    arrival: np.ndarray,
    workload: Workload,
    *,
    seed: int = 0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> RunLatencies:
    """Serves ``workload`` on ``engine`` with request i arriving ``arrival[i]`` s after the
    start: requests whose time has passed are added before each step; when the engine is
    idle it sleeps until the next arrival. Outputs are forced to ``workload.output_lens``
    (greedy, ignore_eos, max_tokens). ``arrival`` must be non-decreasing."""
    rng = np.random.default_rng(seed)
    vocab = engine.model_config.vocab_size
    prompts = [rng.integers(0, vocab, int(n)).tolist() for n in workload.prompt_lens]
    timed = engine.executor = _TimedExecutor(engine.executor)
    requests, num_steps, step_s = [], 0, 0.0
    start = clock()
    i, n = 0, len(prompts)
    while i < n or engine.has_unfinished_requests():
        now = clock()
        while i < n and start + arrival[i] <= now:
            params = SamplingParams(
                temperature=0.0, max_tokens=int(workload.output_lens[i]), ignore_eos=True
            )
            requests.append(
                engine.add_request(f"r{i}", prompts[i], params, arrival_time=start + arrival[i])
            )
            i += 1
        if engine.has_unfinished_requests():
            t0 = clock()
            engine.step()
            step_s += clock() - t0
            num_steps += 1
        elif i < n:
            _wait_until(start + arrival[i], clock, sleep)
    engine.executor = timed.inner
    return _latencies(requests, arrival, start, num_steps, step_s - timed.execute_s)


def _wait_until(deadline: float, clock, sleep) -> None:
    """Sleeps to ~1 ms before ``deadline``, then polls: a sleep can overshoot by a
    scheduler tick on a loaded machine, and that would show up as TTFT."""
    remaining = deadline - clock()
    if remaining > 2e-3:
        sleep(remaining - 1e-3)
    while clock() < deadline:
        pass


def _latencies(requests, arrival, start, num_steps, overhead_s) -> RunLatencies:
    ttft = np.array([r.ttft if r.ttft is not None else np.inf for r in requests])
    tpot = np.array(
        [
            (r.tpot or 0.0) if r.finish_reason == "length" and r.ttft is not None else np.inf
            for r in requests
        ]
    )
    end = max(r.finished_time or start for r in requests)
    extra = {
        "num_steps": float(num_steps),
        "mean_host_overhead_ms": 1e3 * overhead_s / max(num_steps, 1),
    }
    return RunLatencies(ttft, tpot, end - start - float(arrival.min()), extra)
