"""Refinement: the placement search's best-ranked deployments re-scored until stable.

The search screens every configuration on a few hundred requests (fast, but a transient:
two deployments near the top trade places from one seed to the next). `Refiner` takes the
best-ranked ones, estimates their goodput with `steady_state` (warm-up discarded, requests
grown until the attainment interval is tight, an interval around the goodput), sizes
their replicas for the rate again and ranks them first; among those whose per-device
goodput intervals overlap the best's, the fewest devices win.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from distserve_rt.config.placement import PlacementKind
from distserve_rt.planner.candidates import Algorithm, Candidate, num_replicas
from distserve_rt.planner.simulator import ColocatedPolicy, SimMode, SimResult
from distserve_rt.planner.steady_state import Estimate, StableGoodput, SteadyState

if TYPE_CHECKING:
    from distserve_rt.planner.placement import PlanInputs


def sim_args(cand: Candidate, rate: float) -> tuple[object, float, object]:
    """(spec, rate, policy) that simulate ``cand`` carrying ``rate`` req/s (colocated: one
    of its replicas carrying its share, ``rate / num_prefill``, as a random split would)."""
    if cand.placement is PlacementKind.COLOCATED:
        return cand.unit, rate / cand.num_prefill, ColocatedPolicy.CONTINUOUS_BATCHING
    return cand.unit, rate, None


class Refiner:
    """Stable goodputs of one plan's deployments. ``fits`` says whether a deployment fits
    the cluster, ``cluster_key`` is the planner's ranking key (those that fit first)."""

    def __init__(
        self,
        inputs: PlanInputs,
        fits: Callable[[Candidate], bool],
        cluster_key: Callable[[Candidate], tuple],
    ) -> None:
        self.inputs = inputs
        self.fits = fits
        self.cluster_key = cluster_key
        self.steady = SteadyState(
            inputs.pool or inputs.workload,
            inputs.slo,
            inputs.target,
            inputs.rel_tol,
            inputs.cv,
            inputs.seed,
            min_requests=min(1000, inputs.max_requests),
            max_requests=inputs.max_requests,
        )
        self.stable: dict[tuple, tuple[StableGoodput, StableGoodput]] = {}
        """Refined configurations (`config_key`): (prefill or unit, decode or unit) goodputs."""
        self._phase: dict[tuple, StableGoodput] = {}

    @staticmethod
    def config_key(cand: Candidate) -> tuple:
        """A configuration whatever its replica counts."""
        return cand.algorithm, cand.prefill, cand.decode, cand.num_nodes_spanned

    def is_refined(self, cand: Candidate) -> bool:
        return self.config_key(cand) in self.stable

    def goodput_interval(self, cand: Candidate) -> dict[str, float]:
        """``goodput_low``/``goodput_high`` (req/s) of a refined ``cand`` with its replica
        counts, else nothing (a screened goodput has no interval)."""
        if not self.is_refined(cand):
            return {}
        pre, dec = self.stable[self.config_key(cand)]
        if cand.algorithm is Algorithm.PHASES_APART:
            low = min(cand.num_prefill * pre.low, cand.num_decode * dec.low)
            high = min(cand.num_prefill * pre.high, cand.num_decode * dec.high)
        else:
            low, high = cand.num_prefill * pre.low, cand.num_prefill * pre.high
        return {"goodput_low": low, "goodput_high": high}

    def attainment(self, cand: Candidate, rate: float) -> tuple[Estimate, SimResult]:
        """``cand`` carrying ``rate`` req/s until its attainment is stable, and the run."""
        spec, unit_rate, policy = sim_args(cand, rate)
        return self.steady.attainment(spec, unit_rate, policy=policy)

    def attainment_or_zero(self, cand: Candidate, rate: float) -> tuple[float, float]:
        """(mean, half-width) of `attainment`; 0 above the steady-state throughput bound,
        as in the search."""
        spec, unit_rate, policy = sim_args(cand, rate)
        if unit_rate > self.steady.longest.rate_bound(spec, SimMode.FULL, policy):
            return 0.0, 0.0
        est, _ = self.attainment(cand, rate)
        return est.mean, est.half_width

    def refine(self, ranked: list[Candidate]) -> list[Candidate]:
        """The first ``num_refined`` of ``ranked`` with stable goodputs (and replica counts
        for them), before the rest.

        A transient flatters (the queue has not built up yet), so refined goodputs mostly
        fall: while the best refined one ranks below the best unrefined one, the next
        ``num_refined`` are refined too, up to three rounds (OPT-13B on 8 devices at 3
        req/s: colocated tp5, tp2 and tp1 fell below tp8's screened goodput)."""
        num, refined, rest = self.inputs.num_refined, [], ranked
        for _ in range(3):
            if not rest or num == 0:
                break
            refined += filter(None, map(self.refined, rest[:num]))
            rest = rest[num:]
            refined.sort(key=self.cluster_key)
            if refined and (not rest or self.cluster_key(refined[0]) <= self.cluster_key(rest[0])):
                break
        return self.ties_first(refined) + rest

    def ties_first(self, refined: list[Candidate]) -> list[Candidate]:
        """``refined`` with the best one's ties first, fewest devices (then pipeline
        stages) first among them: those whose per-device goodput interval reaches the
        best's. Their order by the means is noise (OPT-175B on 4 x 8 at 4 req/s: 3 x
        colocated tp8 and a 4-node pair both at 0.19 req/s per device, 4000 requests,
        each first for two seeds of four), so the cheaper deployment is the answer."""
        if not refined or not self.fits(refined[0]):
            return refined
        best_low = self.goodput_interval(refined[0])["goodput_low"] / refined[0].num_devices
        ties = [
            c
            for c in refined
            if self.fits(c) and self.goodput_interval(c)["goodput_high"] / c.num_devices >= best_low
        ]
        ties.sort(key=lambda c: (*Candidate.rank_key(c)[1:], -c.per_device))
        return ties + [c for c in refined if all(c is not t for t in ties)]

    def refined(self, cand: Candidate) -> Candidate | None:
        """``cand`` with stable goodputs, None if it meets the target at no rate."""
        rate = self.inputs.rate
        if cand.algorithm is Algorithm.PHASES_APART:
            pre = self._phase_goodput(cand.unit.prefill, SimMode.PREFILL_ONLY, cand)
            dec = self._phase_goodput(cand.unit.decode, SimMode.DECODE_ONLY, cand)
            if pre.rate <= 0 or dec.rate <= 0:
                return None
            n_p, n_d = num_replicas(rate, pre.rate), num_replicas(rate, dec.rate)
            unit = replace(cand.unit, num_prefill=n_p, num_decode=n_d)
        elif cand.algorithm is Algorithm.COLOCATED:
            policy = ColocatedPolicy.CONTINUOUS_BATCHING
            pre = dec = self.steady.goodput(
                cand.unit, policy=policy, rate_hint=cand.prefill_goodput
            )
            if pre.rate <= 0:
                return None
            n_p, n_d, unit = num_replicas(rate, pre.rate), 0, cand.unit
        else:
            pair = replace(cand.unit, num_prefill=1, num_decode=1)
            pre = dec = self.steady.goodput(pair, rate_hint=cand.prefill_goodput)
            if pre.rate <= 0:
                return None
            n_p = n_d = num_replicas(rate, pre.rate)
            unit = replace(cand.unit, num_prefill=n_p, num_decode=n_d)
        self.stable[self.config_key(cand)] = (pre, dec)
        return replace(
            cand,
            num_prefill=n_p,
            num_decode=n_d,
            prefill_goodput=pre.rate,
            decode_goodput=dec.rate,
            unit=unit,
            predicted={},
        )

    def _phase_goodput(self, spec, mode: SimMode, cand: Candidate) -> StableGoodput:
        """Algorithm 1's instances are shared by many candidates: each is refined once."""
        key = (mode, spec.parallelism)
        if key not in self._phase:
            hint = cand.prefill_goodput if mode is SimMode.PREFILL_ONLY else cand.decode_goodput
            self._phase[key] = self.steady.goodput(spec, mode=mode, rate_hint=hint)
        return self._phase[key]
