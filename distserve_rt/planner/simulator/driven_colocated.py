"""Colocated serving simulated by driving the runtime's own scheduler (see driven_instance).

One instance, the engine's loop on a simulated clock: every step ``out = schedule(now)``,
the latency model times the batch, the step's tokens are appended at its end
(``update_from_output``); requests join the queue when the clock passes their arrival.
Policies are `core.scheduler.POLICIES` (continuous_batching, chunked_prefill), exactly as
`LLMEngine` builds them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from distserve_rt.core.request import Request, RequestStatus
from distserve_rt.core.scheduler import make_scheduler
from distserve_rt.planner.simulator.colocated import ColocatedPolicy
from distserve_rt.planner.simulator.conversations import (
    ConversationArrivals,
    ConversationSimResult,
    context_len,
)
from distserve_rt.planner.simulator.driven_instance import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_WATERMARK,
    StepClock,
    StepNoise,
    check_lengths,
    check_pp1,
    make_block_manager,
    make_request,
    make_scheduler_config,
    next_batch,
    resolve_max_model_len,
    sampled_tokens,
)
from distserve_rt.planner.simulator.results import SimResult
from distserve_rt.planner.simulator.spec import SimInstanceSpec
from distserve_rt.workloads.multi_turn import MultiTurnWorkload

_INF = float("inf")


class SchedulerDrivenColocated:
    """Simulate one colocated instance (pp=1) with the runtime's scheduler.

    Args:
        spec: the instance (latency model, KV capacity, ``max_batch_tokens`` = the runtime's
            ``max_num_batched_tokens``, ``max_num_seqs``).
        policy: a colocated policy name.
        block_size, watermark: the engine's KV pool settings.
        max_model_len: the context length; default the longest request (prompt + output).
        noise: multiplies each step's time by ``noise.sample(rng)``; None: deterministic.
        seed: seeds the noise's generator.
        wake: extra seconds of a step that starts after the instance idled (its argument,
            s); None: none.
        loop_s: the engine's loop between two busy steps (s: building outputs, adding the
            requests that arrived), added to every step as `StepClock` does for a
            disaggregated instance's; measured from a step log's start times.
    """

    def __init__(
        self,
        spec: SimInstanceSpec,
        policy: ColocatedPolicy | str,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        watermark: float = DEFAULT_WATERMARK,
        max_model_len: int | None = None,
        noise: StepNoise | None = None,
        seed: int = 0,
        wake: Callable[[float], float] | None = None,
        loop_s: float = 0.0,
    ) -> None:
        check_pp1(spec, "colocated")
        if not 0 <= loop_s < _INF:
            raise ValueError(f"loop_s must be a finite time >= 0 s, got {loop_s!r}")
        self.wake = wake
        self.loop_s = loop_s
        self.spec = spec
        self.policy = ColocatedPolicy(policy)
        self.block_size = block_size
        self.watermark = watermark
        self.max_model_len = max_model_len
        self.noise = noise
        self.seed = seed
        self.block_manager = make_block_manager(spec, block_size, watermark)
        """The last run's pool (tests check it is empty at the end)."""
        self.num_preemptions = 0
        """Preemptions by recompute in the last run."""

    def run(self, arrival, prompt_lens, output_lens) -> SimResult:
        """Arrays ``[num_requests]`` in arrival order (s, tokens, tokens)."""
        arrival, prompt, out = check_lengths(arrival, prompt_lens, output_lens)
        max_len = resolve_max_model_len(self.max_model_len, prompt, out)
        self._check_budget(max_len)
        bm = self.block_manager = make_block_manager(self.spec, self.block_size, self.watermark)
        self.num_preemptions = 0
        sched = make_scheduler(self.policy.value, make_scheduler_config(self.spec, max_len), bm)
        clock = StepClock(
            self.spec.latency, self.noise, np.random.default_rng(self.seed), self.wake, self.loop_s
        )
        n = arrival.size
        requests = [
            make_request(i, prompt[i], out[i], float(arrival[i]), max_len) for i in range(n)
        ]
        arrival_list = arrival.tolist()
        pos = 0

        def pop_due(t: float) -> list[Request]:
            nonlocal pos
            start = pos
            while pos < n and arrival_list[pos] <= t:
                pos += 1
            return requests[start:pos]

        def next_arrival() -> float:
            return arrival_list[pos] if pos < n else _INF

        step_start = self._drive(sched, clock, pop_due, next_arrival, None)
        return _result(arrival, requests, step_start, out)

    def run_conversations(
        self, workload: MultiTurnWorkload, *, prefix_caching: bool = True
    ) -> ConversationSimResult:
        """Replay ``workload``'s conversations closed loop (`conversations`): each turn
        arrives after the previous one's answer plus its think time. ``prefix_caching``: the
        runtime's prefix cache on the instance's pool (its default), so a turn's prefill
        skips the blocks its conversation already holds."""
        max_len = context_len(workload, self.max_model_len)
        self._check_budget(max_len)
        bm = self.block_manager = make_block_manager(
            self.spec, self.block_size, self.watermark, prefix_caching=prefix_caching
        )
        self.num_preemptions = 0
        sched = make_scheduler(self.policy.value, make_scheduler_config(self.spec, max_len), bm)
        clock = StepClock(
            self.spec.latency, self.noise, np.random.default_rng(self.seed), self.wake, self.loop_s
        )
        source = ConversationArrivals(workload, max_len)
        step_start = self._drive(sched, clock, source.pop_due, source.next_arrival, source.finished)
        requests = source.requests
        arrival = np.asarray([r.arrival_time for r in requests], dtype=np.float64)
        out = [r.sampling_params.max_tokens for r in requests]
        return source.result(_result(arrival, requests, step_start, out), [bm])

    def _check_budget(self, max_len: int) -> None:
        if self.policy is ColocatedPolicy.CONTINUOUS_BATCHING and self.spec.max_batch_tokens < (
            max_len
        ):
            raise ValueError(
                f"max_batch_tokens ({self.spec.max_batch_tokens}) must be >= max_model_len "
                f"({max_len}) with continuous_batching: it never splits a prompt (the runtime "
                f"refuses the same config)"
            )

    def _drive(
        self,
        sched,
        clock: StepClock,
        pop_due: Callable[[float], list[Request]],
        next_arrival: Callable[[], float],
        on_finished: Callable[[list[Request]], None] | None,
    ) -> dict[float, float]:
        """The engine's loop on the simulated clock until every request arrived and
        finished; ``on_finished`` sees each finished request (closed-loop arrivals).
        Returns step end -> its start: a request's decode starts with the step of its second
        token (looked up at the end, instead of scanning every step's decodes)."""
        step_start: dict[float, float] = {}
        t = 0.0
        while True:
            for request in pop_due(t):
                sched.add_request(request)
            step, finished, num_preempted = next_batch(sched, t)
            self.num_preemptions += num_preempted
            if on_finished is not None and finished:
                on_finished(finished)
            if step.is_empty:
                upcoming = next_arrival()
                if upcoming < _INF:
                    t = max(t, upcoming)
                    continue
                if sched.has_unfinished_requests():
                    raise RuntimeError(f"the {self.policy.value} scheduler stalled at t={t}")
                return step_start
            end = t + clock.seconds(step, t)
            step_start[end] = t
            update = sched.update_from_output(step, sampled_tokens(step), None, end)
            if on_finished is not None and update.finished:
                on_finished(update.finished)
            t = end


def _result(
    arrival: np.ndarray, requests: list[Request], step_start: dict[float, float], out: list[int]
) -> SimResult:
    n = len(requests)
    ps, pe, ds, fin = ([_INF] * n for _ in range(4))
    for k, r in enumerate(requests):
        if r.status is RequestStatus.FINISHED_ERROR:
            continue  # never fit the pool: misses every SLO
        ps[k] = r.first_scheduled_time
        pe[k] = r.first_token_time
        fin[k] = r.finished_time
        ds[k] = pe[k] if out[k] == 1 else step_start[r.token_times[1]]
    pe_arr = np.asarray(pe)
    return SimResult(
        arrival,
        np.asarray(ps),
        pe_arr,
        pe_arr,
        pe_arr,
        np.asarray(ds),
        np.asarray(fin),
        np.asarray(out, dtype=np.int64),
    )
