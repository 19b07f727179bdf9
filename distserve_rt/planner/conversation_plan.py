"""Plans for multi-turn conversations (`drt-run plan --dataset multi-turn`), where the
prefix cache changes the answer.

The search (`placement.Planner`) scores its thousands of configurations with the fast
simulators, which have no prefix cache and no closed-loop turns. Turn k of a conversation
repeats turns 0..k-1 as its prompt: without the cache every turn prefills the whole
conversation so far, with it only the new part, and how much that saves depends on the
placement (a colocated instance reuses its own KV; a disaggregated pair reuses on the
prefill instance and pulls only the delta to a decode instance that holds the rest). So:

1. **screen**: the search on the conversations' turns flattened
   (`MultiTurnWorkload.flat_lengths`, every turn's whole context prefilled), at the request
   rate the conversations make (conversations/s x mean turns): the fast scores are a floor
   of what the cache allows, and they rank which configurations are worth a closer look;
2. **rescore**: the best-ranked configurations the scheduler-driven simulator can run
   (pp = 1), colocated and disaggregated both, get their goodput in conversations/s on the
   runtime's own schedulers and prefix cache, conversations closed loop: one colocated
   instance, or one prefill plus one decode instance (decode-side reuse, delta pulls and
   the controller's routing rules, `SchedulerDrivenDisaggregated.run_conversations`);
3. **choose**: replicas for the asked rate and the search's order (conversations/s per
   device, then fewest devices); the chosen deployment is simulated whole at the asked rate
   before it is chosen (disaggregated: all its instances behind the controller's routing;
   colocated: one replica carrying its share, which is what the data-parallel router's
   prefix rule keeps a conversation on).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from distserve_rt.config.disagg import DisaggConfig
from distserve_rt.metrics.rate_search import search_rate
from distserve_rt.metrics.slo import SLO
from distserve_rt.planner.candidates import Candidate, fit_to_cluster, num_replicas
from distserve_rt.planner.goodput import GoodputEvaluator
from distserve_rt.planner.placement import PlanInputs, Planner
from distserve_rt.planner.simulator import (
    ColocatedPolicy,
    ConversationSimResult,
    DisaggSpec,
    SchedulerDrivenColocated,
    SchedulerDrivenDisaggregated,
    SimInstanceSpec,
)
from distserve_rt.workloads.multi_turn import MultiTurnWorkload

MakeWorkload = Callable[[float, int], MultiTurnWorkload]
"""(conversations/s, number of conversations) -> the conversations (same seed at every
rate: the same lengths and token ids, start times scaled by the rate)."""

MAX_CHECKS = 3
"""Deployments simulated whole at the asked rate before the best-ranked is given up on."""

MAX_CHECK_UNITS = 8
"""Most disaggregated units a check simulates together: a larger deployment is checked on
this many units carrying their share of the rate (the routing between units is what the
check adds; more units of the same change it little and cost linearly)."""


@dataclass(frozen=True)
class ConversationScore:
    """One simulated run of conversations, scored as the search scores a run."""

    rate: float
    """Conversations/s."""
    attainment: float
    """The lower of all turns and the later half (by arrival): a growing queue shows."""
    hit_rate: float
    """Prompt tokens found in the prefix cache over those looked up."""
    num_requests: int
    breakdown: dict[str, float] = field(default_factory=dict)
    """Mean seconds per turn in each stage (`SimResult.mean_breakdown`)."""
    num_local_prefills: int = 0
    """Disaggregated: turns prefilled on a decode instance (conditional disaggregation)."""

    def to_dict(self) -> dict[str, object]:
        return {
            "conversation_rate": self.rate,
            "attainment": self.attainment,
            "hit_rate": self.hit_rate,
            "num_requests": self.num_requests,
            "num_local_prefills": self.num_local_prefills,
            "mean_breakdown_s": self.breakdown,
        }


@dataclass
class Rescored:
    """A configuration the search ranked, rescored on conversations."""

    candidate: Candidate
    """Replicas for the asked rate; goodputs in conversations/s (one unit's)."""
    screened: Candidate
    """The search's row: req/s of flattened turns, no prefix cache."""
    curve: tuple[tuple[float, float], ...]
    """(conversations/s, attainment) of every rate the goodput search simulated."""
    at_goodput: ConversationScore | None
    check: ConversationScore | None = None
    bound: float = float("inf")
    """`ConversationPlanner.rate_bound` of one unit (conversations/s)."""
    """The deployment simulated whole at the asked rate (only those looked at)."""


@dataclass
class ConversationPlan:
    inputs: PlanInputs
    """The screening search's inputs (its ``rate`` in req/s of flattened turns)."""
    conversation_rate: float
    best: Rescored
    ranked: list[Rescored]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(configuration, why it was not rescored) of the search's best-ranked others."""
    best_effort: bool = False
    """No rescored deployment that fits the cluster carries the rate: ``best`` is the one
    that carries the most on the whole cluster."""
    needed: Rescored | None = None
    """With ``best_effort``: the best-ranked deployment that carries the rate, any size."""


class ConversationPlanner:
    """Screens with `Planner`, rescores on conversations, chooses (see the module doc).

    Args:
        inputs: the screening search's inputs: the flattened turns as its workload and the
            request rate they make as its rate.
        conversation_rate: the conversations/s to serve.
        make_workload: the conversations at a rate (see `MakeWorkload`).
        num_conversations: conversations per rescoring run (the check of a deployment of n
            units runs n times as many).
        prefix_caching: the runtime's prefix cache on (its default) or off.
        disagg_config: the disaggregated runtime's routing settings (decode-side prefix
            cache, load cap, conditional disaggregation) the disaggregated configurations
            are rescored and checked with; None: `DisaggConfig`'s defaults, as serve's.
        max_disaggregated, max_colocated: configurations of each kind rescored, best
            screened first.
    """

    def __init__(
        self,
        inputs: PlanInputs,
        conversation_rate: float,
        make_workload: MakeWorkload,
        *,
        num_conversations: int = 100,
        prefix_caching: bool = True,
        disagg_config: DisaggConfig | None = None,
        max_disaggregated: int = 3,
        max_colocated: int = 2,
    ) -> None:
        if not conversation_rate > 0:
            raise ValueError(f"conversation_rate must be > 0, got {conversation_rate!r}")
        if isinstance(num_conversations, bool) or not isinstance(num_conversations, int):
            raise ValueError(f"num_conversations must be an int >= 10, got {num_conversations!r}")
        if num_conversations < 10:
            raise ValueError(f"num_conversations must be an int >= 10, got {num_conversations}")
        self.inputs = inputs
        self.rate = conversation_rate
        self.make_workload = make_workload
        self.num_conversations = num_conversations
        self.prefix_caching = prefix_caching
        dc = DisaggConfig() if disagg_config is None else disagg_config
        if not isinstance(dc, DisaggConfig):
            raise ValueError(f"disagg_config must be a DisaggConfig or None, got {dc!r}")
        self.disagg_config = dc
        self.quota = {True: max_colocated, False: max_disaggregated}
        self.planner = Planner(inputs)
        self.num_simulations = 0

    # ---- scoring ----------------------------------------------------------------------

    def score(self, unit: DisaggSpec | SimInstanceSpec, rate: float, num_units: int = 1):
        """``unit`` (one colocated instance, or a disaggregated deployment) serving
        ``num_conversations x num_units`` conversations starting at ``rate``/s."""
        workload = self.make_workload(rate, self.num_conversations * num_units)
        seed = self.inputs.seed
        caching = self.prefix_caching
        if isinstance(unit, SimInstanceSpec):
            sim = SchedulerDrivenColocated(unit, ColocatedPolicy.CONTINUOUS_BATCHING, seed=seed)
            got = sim.run_conversations(workload, prefix_caching=caching)
        else:
            sim = SchedulerDrivenDisaggregated(unit, seed=seed)
            got = sim.run_conversations(
                workload, prefix_caching=caching, disagg_config=self.disagg_config
            )
        self.num_simulations += 1
        r = got.result
        return ConversationScore(
            rate, _attainment(got, self.inputs.slo), got.hit_rate, r.num_requests,
            r.mean_breakdown(), got.num_local_prefills,
        )  # fmt: skip

    def rate_bound(self, unit: DisaggSpec | SimInstanceSpec) -> float:
        """Conversations/s no run of ``unit`` sustains, however well a finite one scores:
        a few closed-loop conversations never pile up enough to show overload (20 of them
        "met" the SLOs at 10^5 conversations/s). The search's steady-state bounds
        (`GoodputEvaluator.rate_bound`) with the prefill side on each turn's new tokens
        only (no cache does better) and the decode side on the whole turns (the cache
        does not shorten decoding), divided by the turns per conversation. Without the
        cache, the prefill side on the whole turns too. With conditional disaggregation
        on, decode instances prefill some turns themselves, so the prefill side is what
        the prefill and decode instances could prefill together."""
        conversations = self.make_workload(self.rate, self.num_conversations)
        flat = GoodputEvaluator(conversations.flat_lengths(), self.inputs.slo)
        new = flat
        if self.prefix_caching:
            new = GoodputEvaluator(conversations.new_token_lengths(), self.inputs.slo)
        if isinstance(unit, SimInstanceSpec):  # continuous batching: the two add up
            prefill, decode = new.prefill_rate_bound(unit), flat.decode_rate_bound(unit)
            bound = 0.0 if min(prefill, decode) <= 0 else 1 / (1 / prefill + 1 / decode)
        else:
            prefill = new.prefill_rate_bound(unit)
            if self._local_prefills():
                prefill += unit.num_decode * new.prefill_rate_bound(unit.decode)
            bound = min(prefill, flat.decode_rate_bound(unit))
        return bound / mean_turns(conversations)

    def _local_prefills(self) -> bool:
        """Conditional disaggregation on: some turns may prefill on a decode instance."""
        dc = self.disagg_config
        return dc.local_prefill_max_tokens > 0 or dc.local_prefill_min_queue_tokens > 0

    def _rescore(self, screened: Candidate, rate_hint: float) -> Rescored | None:
        unit = _one_unit(screened, self.inputs.colocated_max_batch_tokens)
        seen: dict[float, ConversationScore] = {}
        bound = self.rate_bound(unit)

        def at(rate: float) -> float:
            if rate > bound:
                return 0.0  # above steady-state throughput: the queue grows forever
            seen[rate] = self.score(unit, rate)
            return seen[rate].attainment

        i = self.inputs
        rate, curve = search_rate(at, i.target, rate_hint=rate_hint, rel_tol=i.rel_tol)
        if rate <= 0:
            return None
        n = num_replicas(self.rate, rate)
        disagg = screened.decode is not None
        cand = replace(
            screened,
            num_prefill=n,
            num_decode=n if disagg else 0,
            prefill_goodput=rate,
            decode_goodput=rate,
            unit=replace(unit, num_prefill=n, num_decode=n) if disagg else unit,
            predicted={},
        )
        return Rescored(cand, screened, tuple(sorted(curve.items())), seen[rate], bound=bound)

    def check(self, r: Rescored, rate: float) -> ConversationScore:
        """``r``'s deployment at ``rate`` conversations/s, simulated whole (colocated: one
        replica carrying its share; disaggregated: up to `MAX_CHECK_UNITS` units with
        the controller's routing between them, carrying their share). The score's rate
        is ``rate``, the deployment's."""
        c = r.candidate
        if isinstance(c.unit, SimInstanceSpec):
            got = self.score(c.unit, rate / c.num_prefill)
        else:
            k = min(c.num_prefill, MAX_CHECK_UNITS)
            unit = replace(c.unit, num_prefill=k, num_decode=k)
            got = self.score(unit, rate * k / c.num_prefill, num_units=k)
        return replace(got, rate=rate)

    # ---- the plan -----------------------------------------------------------------------

    def run(self, progress: Callable[[str], None] | None = None) -> ConversationPlan:
        screened = self.planner.screen()
        chosen, skipped = self._to_rescore(screened)
        if not chosen:
            raise ValueError(
                "no configuration the scheduler-driven simulator can run (pp = 1) meets the "
                "SLOs on the flattened turns; " + "; ".join(f"{c}: {why}" for c, why in skipped[:3])
            )
        mean_turns = self.inputs.rate / self.rate
        rescored = []
        for cand in chosen:
            if progress is not None:
                progress(cand.label())
            # The screening goodput (req/s of whole-context turns) as conversations/s: a
            # floor of what the cache allows, so the bracket starts at or below the answer.
            floor = min(cand.prefill_goodput, cand.decode_goodput)
            r = self._rescore(cand, rate_hint=floor / mean_turns)
            if r is not None:
                rescored.append(r)
        if not rescored:
            raise ValueError(
                "no rescored configuration meets the SLOs on conversations at any rate: "
                + ", ".join(c.label() for c in chosen)
            )
        ranked = sorted(rescored, key=lambda r: self.planner.cluster_key(r.candidate))
        fits = [r for r in ranked if self._fits(r.candidate)]
        best = self._first_meeting(fits, self.rate)
        if best is not None:
            return ConversationPlan(self.inputs, self.rate, best, ranked, skipped)
        effort = self._best_effort(ranked)
        needed = self._first_meeting(ranked, self.rate) or ranked[0]
        return ConversationPlan(
            self.inputs, self.rate, effort, ranked, skipped, best_effort=True, needed=needed
        )

    def _to_rescore(self, screened: list[Candidate]) -> tuple[list[Candidate], list]:
        """The best screened configurations of each kind that pp = 1 allows, within quota."""
        chosen, skipped = [], []
        left = dict(self.quota)
        for cand in screened:
            colocated = cand.decode is None
            if left[colocated] == 0:
                continue
            pp = max(cand.prefill.pp_size, 1 if colocated else cand.decode.pp_size)
            if pp > 1:
                skipped.append(
                    (cand.label(), f"pp={pp}: the scheduler-driven simulator runs pp=1 only")
                )
                continue
            chosen.append(cand)
            left[colocated] -= 1
        return chosen, skipped

    def _fits(self, cand: Candidate) -> bool:
        return cand.num_devices <= self.inputs.cluster.num_devices

    def _first_meeting(self, ranked: list[Rescored], rate: float) -> Rescored | None:
        """The first of ``ranked`` (up to `MAX_CHECKS`) whose deployment meets the target
        simulated whole at ``rate``."""
        for r in ranked[:MAX_CHECKS]:
            if r.check is None or r.check.rate != rate:
                r.check = self.check(r, rate)
            if r.check.attainment >= self.inputs.target:
                return r
        return None

    def _best_effort(self, ranked: list[Rescored]) -> Rescored:
        """Each configuration with as many units as the cluster holds, the most
        conversations/s first; checked whole at the rate it sustains."""
        num_devices = self.inputs.cluster.num_devices
        scaled = []
        for r in ranked:
            cand = fit_to_cluster(r.candidate, num_devices)
            if cand is not None:
                scaled.append(replace(r, candidate=cand, check=None))
        if not scaled:
            least = min(ranked, key=lambda r: r.candidate.num_devices / r.candidate.num_prefill)
            c = least.candidate
            raise ValueError(
                f"nothing fits the cluster: the smallest configuration, {c.label()}, needs "
                f"{c.devices_per_prefill + c.devices_per_decode} devices, the cluster has "
                f"{num_devices}"
            )
        scaled.sort(key=lambda r: (-r.candidate.goodput, r.candidate.rank_key()))
        best = scaled[0]
        best.check = self.check(best, best.candidate.goodput)
        return best


def _one_unit(cand: Candidate, colocated_budget: int) -> DisaggSpec | SimInstanceSpec:
    """What one unit of ``cand`` is: one colocated instance (its token budget raised to
    the runtime's default for the conversations' context, as `EngineConfig` raises it),
    or one prefill and one decode instance."""
    if isinstance(cand.unit, SimInstanceSpec):
        budget = max(cand.unit.max_batch_tokens, colocated_budget)
        return replace(cand.unit, max_batch_tokens=budget)
    return replace(cand.unit, num_prefill=1, num_decode=1)


def _attainment(got: ConversationSimResult, slo: SLO) -> float:
    r = got.result
    met = (r.ttft <= slo.ttft_s) & (r.tpot <= slo.tpot_s)
    if met.size == 0:
        return 0.0
    return float(min(met.mean(), met[met.size // 2 :].mean()))


def mean_turns(workload: MultiTurnWorkload) -> float:
    """Turns per conversation: conversations/s x this = requests/s in steady state."""
    return workload.num_requests / workload.num_conversations


__all__ = [
    "ConversationPlan",
    "ConversationPlanner",
    "ConversationScore",
    "Rescored",
    "mean_turns",
]
