"""The runtime side: the same requests at the same arrival times, served by any `EngineCore`
(the colocated `LLMEngine` or the disaggregated `Controller`)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from distserve_rt.benchmarks.sim_vs_runtime.latencies import RunLatencies, latencies_from_outputs
from distserve_rt.engine.protocol import EngineCore
from distserve_rt.sampling_params import SamplingParams
from distserve_rt.workloads.workload import Workload

IDLE_POLL_S = 0.05
"""Longest a disaggregated `step` waits for the instances' messages when no arrival is due:
it returns as soon as one comes, so this only bounds how late the loop notices the end."""


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
    engine: EngineCore,
    arrival: np.ndarray,
    workload: Workload,
    *,
    seed: int = 0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    progress: Callable[[int], None] | None = None,
) -> RunLatencies:
    """Serves ``workload`` on ``engine`` with request ``r{i}`` arriving ``arrival[i]`` s after
    the start: requests whose time has passed are added before each step; a step waits for
    the instances (disaggregated) at most until the next arrival; an idle engine sleeps until
    it. Outputs are forced to ``workload.output_lens`` (greedy, ignore_eos, max_tokens).
    ``arrival`` must be non-decreasing; ``progress(n)`` is told of each n finished requests.

    ``clock`` must be the engine's clock (``time.monotonic``; tests may pass another where
    only the arrivals matter): request latencies are taken from the engine's timestamps.
    """
    rng = np.random.default_rng(seed)
    vocab = engine.model_config.vocab_size
    prompts = [rng.integers(0, vocab, int(n)).tolist() for n in workload.prompt_lens]
    # Colocated engines expose their executor: time it to tell model time from host time.
    timed = _TimedExecutor(engine.executor) if hasattr(engine, "executor") else None
    if timed is not None:
        engine.executor = timed
    finished, num_steps, step_s, between_s = [], 0, 0.0, 0.0
    last_end = None  # end of the previous step while work remained
    start = clock()
    i, n = 0, len(prompts)
    try:
        while i < n or engine.has_unfinished_requests():
            now = clock()
            while i < n and start + arrival[i] <= now:
                params = SamplingParams(
                    temperature=0.0, max_tokens=int(workload.output_lens[i]), ignore_eos=True
                )
                engine.add_request(f"r{i}", prompts[i], params, arrival_time=start + arrival[i])
                i += 1
            if engine.has_unfinished_requests():
                wait = start + arrival[i] - now if i < n else IDLE_POLL_S
                t0 = clock()
                if last_end is not None:  # the loop's own time between two busy steps
                    between_s += t0 - last_end
                done = [o for o in engine.step(min(max(wait, 0.0), IDLE_POLL_S)) if o.finished]
                last_end = clock()
                step_s += last_end - t0
                num_steps += 1
                finished += done
                if progress is not None and done:
                    progress(len(done))
            elif i < n:
                last_end = None  # idle: the wait for the next arrival is not the loop's cost
                _wait_until(start + arrival[i], clock, sleep)
    finally:
        if timed is not None:
            engine.executor = timed.inner
    run = latencies_from_outputs(finished, n, start, float(arrival.min()))
    run.extra["num_steps"] = float(num_steps)
    run.extra["mean_between_steps_ms"] = 1e3 * between_s / max(num_steps, 1)
    if timed is not None:
        overhead_s = step_s - timed.execute_s
        run.extra["mean_host_overhead_ms"] = 1e3 * overhead_s / max(num_steps, 1)
    return run


def _wait_until(deadline: float, clock, sleep) -> None:
    """Sleeps to ~1 ms before ``deadline``, then polls: a sleep can overshoot by a
    scheduler tick on a loaded machine, and that would show up as TTFT."""
    remaining = deadline - clock()
    if remaining > 2e-3:
        sleep(remaining - 1e-3)
    while clock() < deadline:
        pass
