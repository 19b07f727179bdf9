"""Goodput: the highest request rate meeting an SLO attainment target, per device.

Every rate tried replays the same requests with the same unit inter-arrival gaps scaled by
1/rate (common random numbers), so attainment falls (almost) monotonically with rate and a
bracket-then-bisect search is stable: double or halve the rate until attainment crosses the
target, then bisect until the bracket is within ``rel_tol`` of its upper end. The result
is the bracket's lower end, a rate that was simulated and met the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from distserve_rt.metrics.rate_search import search_rate
from distserve_rt.metrics.slo import SLO, slo_scale
from distserve_rt.planner.simulator import (
    ColocatedPolicy,
    ColocatedSimulator,
    DisaggregatedSimulator,
    DisaggSpec,
    SimInstanceSpec,
    SimMode,
    SimResult,
)
from distserve_rt.workloads.arrivals import unit_interarrivals
from distserve_rt.workloads.workload import Workload


@dataclass(frozen=True)
class GoodputResult:
    rate: float
    """Highest rate found with attainment >= target (req/s); 0 if none down to min_rate."""
    num_devices: int
    num_simulations: int
    curve: tuple[tuple[float, float], ...] = ()
    """(rate, attainment) of every simulated rate, sorted by rate."""

    @property
    def per_device(self) -> float:
        return self.rate / self.num_devices


@dataclass
class GoodputEvaluator:
    """Simulates configurations on one sampled workload and scores them against ``slo``."""

    workload: Workload
    slo: SLO
    target: float = 0.9
    rel_tol: float = 0.02
    cv: float = 1.0
    seed: int = 0
    _gaps: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.target <= 1:
            raise ValueError(f"target must be in (0, 1], got {self.target!r}")
        self._gaps = np.cumsum(
            unit_interarrivals(self.workload.num_requests, cv=self.cv, seed=self.seed)
        )

    def arrivals(self, rate: float) -> np.ndarray:
        return self._gaps / rate

    def simulate(
        self,
        spec: DisaggSpec | SimInstanceSpec,
        rate: float,
        *,
        mode=SimMode.FULL,
        policy: ColocatedPolicy | None = None,
    ) -> SimResult:
        """Disaggregated ``spec`` in ``mode``, or an SimInstanceSpec: colocated under ``policy``,
        or alone in its phase (``mode`` prefill_only / decode_only, no policy)."""
        return self.replay(spec, self.arrivals(rate), mode=mode, policy=policy)

    def replay(
        self,
        spec: DisaggSpec | SimInstanceSpec,
        arrival_s: np.ndarray,
        *,
        mode=SimMode.FULL,
        policy: ColocatedPolicy | None = None,
    ) -> SimResult:
        """Like `simulate`, with the workload's requests arriving at ``arrival_s`` (s,
        ``[num_requests]``, non-decreasing: an arrival trace) instead of at a rate."""
        w = self.workload
        mode = SimMode(mode)
        if isinstance(spec, SimInstanceSpec) and policy is None:
            if mode is SimMode.FULL:
                raise ValueError("an SimInstanceSpec needs a colocated policy or a phase-only mode")
            sim = DisaggregatedSimulator(DisaggSpec(spec, spec), mode)
        elif isinstance(spec, SimInstanceSpec):
            sim = ColocatedSimulator(spec, policy)
        else:
            sim = DisaggregatedSimulator(spec, mode)
        return sim.run(arrival_s, w.prompt_lens, w.output_lens)

    def attainment(self, result: SimResult, mode: SimMode = SimMode.FULL) -> float:
        """Joint attainment, or TTFT-only (prefill_only) / TPOT-only (decode_only).

        Scored as the lower of all requests and the later half (by arrival): a finite run
        above capacity can still meet the SLOs on average (TPOT spreads a long wait over
        many tokens), but its queue grows, so its later requests fare worse; a stable rate
        scores the same on both.
        """
        met = self.met(result, mode)
        return float(min(met.mean(), met[met.size // 2 :].mean()))

    def met(self, result: SimResult, mode: SimMode = SimMode.FULL) -> np.ndarray:
        """Whether each request (bool ``[num_requests]``, in the workload's order, which
        is arrival order) met the SLOs that ``mode`` scores (see `attainment`)."""
        mode = SimMode(mode)
        if mode is SimMode.PREFILL_ONLY:
            return result.ttft <= self.slo.ttft_s
        if mode is SimMode.DECODE_ONLY:
            return result.tpot <= self.slo.tpot_s
        return (result.ttft <= self.slo.ttft_s) & (result.tpot <= self.slo.tpot_s)

    def goodput(
        self,
        spec,
        *,
        mode=SimMode.FULL,
        policy=None,
        rate_hint: float = 1.0,
        num_devices: int | None = None,
    ) -> GoodputResult:
        """Highest rate meeting ``target`` for ``spec`` (see `simulate` for the arguments)."""
        mode = SimMode(mode)
        bound = self.rate_bound(spec, mode, policy)

        def at(rate: float) -> float:
            if rate > bound:
                return 0.0  # above steady-state throughput: the queue grows forever
            return self.attainment(self.simulate(spec, rate, mode=mode, policy=policy), mode)

        rate, seen = search_rate(at, self.target, rate_hint=rate_hint, rel_tol=self.rel_tol)
        devices = num_devices if num_devices is not None else spec.num_devices
        return GoodputResult(rate, devices, len(seen), tuple(sorted(seen.items())))

    def rate_bound(
        self,
        spec: DisaggSpec | SimInstanceSpec,
        mode=SimMode.FULL,
        policy: ColocatedPolicy | None = None,
    ) -> float:
        """Steady-state throughput bound (req/s) of what `simulate` runs with these arguments.

        No rate above it is sustainable, however well a finite run of a few hundred requests
        scores there (the queue grows, but not fast enough to show before the run ends).
        A colocated instance under continuous batching runs prefill steps and decode steps
        one after the other on the same devices, so their times per request add up:
        ``1 / (1/prefill bound + 1/decode bound)`` (OPT-13B tp5, 120 requests: without it
        the search found 20 req/s, the decode-only bound; 1000 requests find 11). Chunked
        prefill folds decodes into prefill steps, so the times do not add up; it keeps the
        decode bound alone.
        """
        mode = SimMode(mode)
        if isinstance(spec, SimInstanceSpec) and policy is not None:
            if ColocatedPolicy(policy) is ColocatedPolicy.CHUNKED_PREFILL:
                return self.decode_rate_bound(spec)
            prefill, decode = self.prefill_rate_bound(spec), self.decode_rate_bound(spec)
            return 0.0 if min(prefill, decode) <= 0 else 1 / (1 / prefill + 1 / decode)
        if mode is SimMode.PREFILL_ONLY:
            return self.prefill_rate_bound(spec)
        if mode is SimMode.DECODE_ONLY:
            return self.decode_rate_bound(spec)
        return min(self.prefill_rate_bound(spec), self.decode_rate_bound(spec))

    def prefill_rate_bound(self, spec: DisaggSpec | SimInstanceSpec) -> float:
        """Most requests/s the prefill side can take in steady state (an upper bound).

        Without it a pipeline instance looked far better than it is: with PP = k a batch
        holds stage 0 for only 1/k of its time, so a burst of a few hundred requests clears
        before the queue shows that the rate is above throughput (OPT-13B, 120 requests:
        tp4pp8 scored 400 req/s, its throughput is 206). Every batch holds each stage for
        ``prefill_s(batch) / pp``; a batch takes at most L_m (``max_batch_tokens``) prompt
        tokens, or one longer prompt alone, so the batches of the workload's prompts are at
        least ``#(prompts > L_m) + ceil(Σ other prompt tokens / L_m)``. With a step time
        affine in (Σl, Σl²), as both forms in `latency_model` are, the stage time of all
        the prompts is ``(work + num_batches × fixed cost) / pp``.
        """
        num = 1
        if isinstance(spec, DisaggSpec):
            spec, num = spec.prefill, spec.num_prefill
        prompts = self.workload.prompt_lens.astype(np.int64)
        fixed_s = spec.latency.prefill_s(0, 0)
        work_s = spec.latency.prefill_s(int(prompts.sum()), int((prompts * prompts).sum()))
        work_s -= fixed_s
        long = prompts > spec.max_batch_tokens
        num_batches = int(long.sum()) + math.ceil(int(prompts[~long].sum()) / spec.max_batch_tokens)
        stage_s = (work_s + num_batches * fixed_s) / spec.parallelism.pp_size
        return math.inf if stage_s <= 0 else num * prompts.size / stage_s

    def decode_rate_bound(self, spec: DisaggSpec | SimInstanceSpec) -> float:
        """Most requests/s the decode side can finish in steady state (an upper bound).

        A finite run cannot show overload of the decode side by itself: requests pile up in
        a burst, and TPOT spreads their wait over hundreds of tokens. At most
        ``B = min(max_num_seqs, capacity / mean(prompt + output))`` requests decode at once,
        each for ``mean(output) − 1`` steps of the step time at batch B, so no rate above
        ``B / (steps × step time)`` is sustainable.
        """
        num = 1
        if isinstance(spec, DisaggSpec):
            spec, num = spec.decode, spec.num_decode
        w = self.workload
        mean_out = float(w.output_lens.mean())
        batch = min(
            spec.max_num_seqs,
            int(spec.kv_capacity_tokens // float((w.prompt_lens + w.output_lens).mean())),
        )
        if batch < 1:
            return 0.0
        num_stages = spec.parallelism.pp_size
        lane_batch = max(1, batch // num_stages)
        ctx = float(w.prompt_lens.mean()) + mean_out / 2
        step = spec.latency.decode_s(lane_batch, int(lane_batch * ctx))
        step += (num_stages - 1) * spec.pipeline.hop_s(lane_batch)
        return num * batch / (max(mean_out - 1, 1.0) * step)

    def slo_scale(self, spec, rate: float, *, policy=None) -> float:
        """Tightest factor on both SLOs that ``target`` of the requests meet at ``rate``."""
        result = self.simulate(spec, rate, policy=policy)
        return slo_scale(result.ttft, result.tpot, self.slo, self.target)
