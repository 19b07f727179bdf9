"""Placement search: the paper's Algorithm 1 (high node affinity) and Algorithm 2 (low).

Algorithm 1 (cross-node bandwidth is high, so instances may sit anywhere): score every
feasible prefill `Parallelism` (TP x PP) alone on TTFT and every decode one alone on TPOT, then
replicate each for the traffic rate: ``num_prefill = ceil(rate / prefill goodput)`` and
likewise for decode; every (prefill, decode) choice is a deployment.

Algorithm 2 (cross-node bandwidth is low): a pipeline across ``s`` nodes, each node holding
one stage's prefill segment (tp_p × pp_p devices) *and* the same stage's decode segment
(tp_d × pp_d), with ``tp_p·pp_p + tp_d·pp_d ≤ devices per node``, so every layer's KV moves
over NVLink inside a node. A (prefill, decode) pair is scored by a full simulation and
replicated: ``n = ceil(rate / pair goodput)``; pairs whose phase-alone goodputs already
bound them below the best deployment found are skipped (a pair cannot serve more than
either of its instances alone).

Deployments, disaggregated and colocated (vLLM-style continuous batching, TP only) alike,
are ranked by their goodput per device at the rate, replicas included (`candidates` says
why replicas count), those that fit the cluster first. The chosen placement is the
best-ranked one that fits the cluster and meets the target when simulated whole at the
rate. The search screens every configuration on the workload's few hundred requests; the
best-ranked are then re-scored until stable (`refine`) and ranked first, so the answer
does not change with the seed and comes with an interval (see `PlanResult.predicted`).
The deployment about to be chosen is run once more on the runtime's own schedulers
(`verify`: the fast simulators never preempt, the runtime does); it is chosen only if it
meets the target there too. When none does, the answer is the best the cluster can run:
each configuration with as many replicas as the cluster holds, ranked the same way, and
the rate it sustains; beside it, the deployment that would meet the target (and its
devices).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from tqdm import tqdm

from distserve_rt.config.parallelism import Parallelism
from distserve_rt.metrics.slo import SLO
from distserve_rt.models.config import ModelConfig
from distserve_rt.planner.candidates import (
    Algorithm,
    Candidate,
    fit_to_cluster,
    num_replicas,
    parallelism_label,
)
from distserve_rt.planner.cluster import (
    ClusterSpec,
    build_instance,
    divisors,
    dtype_bytes,
    infeasibility,
    resolve_dtype,
)
from distserve_rt.planner.goodput import GoodputEvaluator, GoodputResult
from distserve_rt.planner.profiles import ProfileSet
from distserve_rt.planner.refine import Refiner, sim_args
from distserve_rt.planner.simulator import (
    ColocatedPolicy,
    DisaggSpec,
    KVTransferSpec,
    SimInstanceSpec,
    SimMode,
    SimResult,
)
from distserve_rt.planner.verify import check_with_schedulers
from distserve_rt.workloads.workload import Workload

# The chosen deployment is re-run on the runtime's schedulers (planner/verify.py): on this
# many requests (enough for a 95% interval of a few points), and for at most this many
# candidates before the search's own estimate is taken as it is.
POLICY_CHECK_REQUESTS = 1000
MAX_POLICY_CHECKS = 3


class Affinity(str, Enum):
    HIGH = "high"
    LOW = "low"


@dataclass(frozen=True)
class PlanInputs:
    model: ModelConfig
    cluster: ClusterSpec
    workload: Workload
    """Requests the search screens every configuration on (a few hundred, for speed)."""
    slo: SLO
    profile: ProfileSet
    rate: float
    """Traffic rate to serve, req/s."""
    affinity: Affinity = Affinity.LOW
    target: float = 0.9
    prefill_max_batch_tokens: int = 512
    colocated_max_batch_tokens: int = 2048
    rel_tol: float = 0.03
    seed: int = 0
    cv: float = 1.0
    """Arrival burstiness: 1 = Poisson, else gamma inter-arrivals with this CV."""
    show_progress: bool = True
    num_predicted: int = 10
    """Best-ranked deployments simulated whole at the rate (table rows with predictions,
    and how far down the ranking the chosen one is looked for)."""
    pool: Workload | None = None
    """What the stable estimates draw their requests from (the dataset ``workload`` was
    sampled from); None: ``workload`` itself."""
    num_refined: int = 3
    """Best-ranked configurations (after screening) whose goodput is re-estimated until
    stable; 0: the screen's ranking stands, and predictions are single runs of
    ``workload`` (the old answer, which changes with the seed)."""
    max_requests: int = 4000
    """Most requests one stable estimate simulates (the warm-up included)."""
    max_pp: int | None = None
    """Largest pipeline-parallel size searched (None: any). A multi-turn plan searches
    pp = 1 only: the scheduler-driven simulator that rescores it runs pp = 1."""
    dtype: str | None = None
    """Weights and KV dtype the plan is for (KV capacity, weights, KV transfer bytes);
    None: the profile's measured dtype (`cluster.resolve_dtype`). Written to the
    placement file for `serve` to run."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "affinity", Affinity(self.affinity))
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, self.profile))
        for key in ("num_refined", "max_requests"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < (0 if key == "num_refined" else 100):
                least = "0" if key == "num_refined" else "100"
                raise ValueError(f"{key} must be an int >= {least}, got {value!r}")
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0 req/s, got {self.rate!r}")
        if self.max_pp is not None and (
            isinstance(self.max_pp, bool) or not isinstance(self.max_pp, int) or self.max_pp < 1
        ):
            raise ValueError(f"max_pp must be None or an int >= 1, got {self.max_pp!r}")
        if not isinstance(self.num_predicted, int) or self.num_predicted < 1:
            raise ValueError(f"num_predicted must be a positive int, got {self.num_predicted!r}")


@dataclass
class PlanResult:
    inputs: PlanInputs
    best: Candidate
    """The chosen deployment: the best-ranked one that fits the cluster and, simulated
    whole at the rate, meets the target; if none does, the best the cluster can run
    (``best_effort``; ``best.goodput`` is the rate it sustains, see ``best.predicted``)."""
    ranked: list[Candidate]
    """Disaggregated and colocated deployments at the rate: those that fit the cluster
    first, each part in `Candidate.rank_key` order."""
    rejected: list[tuple[str, list[str]]]
    """(config, reasons) of configurations that cannot run."""
    best_effort: bool = False
    """True when no deployment that fits the cluster meets the target at the rate."""
    needed: Candidate | None = None
    """Best effort only: the best-ranked deployment that carries the rate whatever the
    cluster (what would meet the target; its ``predicted`` says whether it does)."""

    @property
    def num_prefill(self) -> int:
        return self.best.num_prefill

    @property
    def num_decode(self) -> int:
        return self.best.num_decode

    @property
    def num_devices(self) -> int:
        return self.best.num_devices

    @property
    def predicted(self) -> dict[str, object]:
        """The chosen deployment simulated at the rate: attainment (``scored_attainment``,
        the mean, within ``attainment_low``..``attainment_high``, a 95% interval),
        goodput within ``goodput_low``..``goodput_high`` (refined configurations), and
        latency percentiles."""
        return self.best.predicted


class Planner:
    def __init__(self, inputs: PlanInputs) -> None:
        self.inputs = inputs
        self.evaluator = GoodputEvaluator(
            inputs.workload, inputs.slo, inputs.target, inputs.rel_tol, inputs.cv, inputs.seed
        )
        self.rejected: list[tuple[str, list[str]]] = []
        self.num_feasible = 0
        """Instances that passed `infeasibility`: 0 means the model fits nowhere."""
        self._largest_rejected: tuple[int, str] = (0, "")
        """(tp x pp, "config: reasons") of the largest instance rejected."""
        self._phase_cache: dict[tuple, GoodputResult] = {}
        self.refiner = Refiner(inputs, self._fits, self._cluster_key)
        """Stable goodputs of the best-ranked deployments (`refine`)."""

    # ---- building blocks ---------------------------------------------------------------

    def _instance(
        self, parallelism: Parallelism, stage_link, max_batch_tokens: int
    ) -> SimInstanceSpec:
        i = self.inputs
        return build_instance(
            i.model,
            parallelism,
            cluster=i.cluster,
            profile=i.profile,
            stage_link=stage_link,
            max_batch_tokens=max_batch_tokens,
            dtype=i.dtype,
        )

    def _feasible(self, parallelism: Parallelism, label: str, max_tp: int | None = None) -> bool:
        i = self.inputs
        reasons = infeasibility(
            i.model,
            parallelism,
            i.cluster,
            i.profile.hardware,
            i.workload.max_seq_len(),
            max_tp,
            dtype=i.dtype,
        )
        if reasons:
            config = f"{label} {parallelism_label(parallelism)}"
            self.rejected.append((config, reasons))
            if parallelism.world_size > self._largest_rejected[0]:
                self._largest_rejected = (parallelism.world_size, f"{config}: {', '.join(reasons)}")
        else:
            self.num_feasible += 1
        return not reasons

    def _kv_transfer(self, link, num_streams: int) -> KVTransferSpec:
        per_token = self.inputs.model.kv_bytes_per_token(dtype_bytes(self.inputs.dtype)) / (
            link.bandwidth_bytes_per_s * num_streams
        )
        return KVTransferSpec(per_token, link.latency_s)

    def _hint(self, spec, mode=SimMode.FULL, policy=None) -> float:
        """A starting rate near the answer: saves bracketing steps."""
        bound = self.evaluator.rate_bound(spec, mode, policy)
        return max(0.05, 0.5 * bound) if math.isfinite(bound) else 1.0

    def phase_goodput(self, spec: SimInstanceSpec, mode: SimMode, key: tuple) -> GoodputResult:
        if key not in self._phase_cache:
            hint = self._hint(spec, mode)
            self._phase_cache[key] = self.evaluator.goodput(spec, mode=mode, rate_hint=hint)
        return self._phase_cache[key]

    def simulate_at(self, cand: Candidate, rate: float) -> SimResult:
        """The deployment of ``cand`` carrying ``rate`` req/s, on the screening workload."""
        spec, rate, policy = sim_args(cand, rate)
        return self.evaluator.simulate(spec, rate, policy=policy)

    def _predict(self, cand: Candidate, rate: float | None = None) -> None:
        """Simulate ``cand`` whole at ``rate`` (default: the requested rate): a refined
        configuration until its attainment is stable, the others once on the screening
        workload (their table rows are for comparison; the answer is among the refined)."""
        if cand.predicted:
            return
        i = self.inputs
        rate = i.rate if rate is None else rate
        if self.refiner.is_refined(cand):
            est, result = self.refiner.attainment(cand, rate)
            scored = est.mean
            interval = {
                "attainment_low": est.low,
                "attainment_high": est.high,
                "attainment_half_width": est.half_width,
                "num_requests_simulated": est.num_requests,
            }
        else:
            result = self.simulate_at(cand, rate)
            scored, interval = self.evaluator.attainment(result), {}
        cand.predicted = {
            "rate": rate,
            "scored_attainment": scored,
            "meets_target": scored >= i.target,
            **interval,
            **self.refiner.goodput_interval(cand),
            **result.summary(i.slo).to_dict(),
        }

    def _fits(self, cand: Candidate) -> bool:
        return cand.num_devices <= self.inputs.cluster.num_devices

    def _cluster_key(self, cand: Candidate) -> tuple:
        """`Candidate.rank_key`, those that fit the cluster first."""
        return (not self._fits(cand), *cand.rank_key())

    # ---- the search -----------------------------------------------------------------------

    def screen(self) -> list[Candidate]:
        """Every deployment the search found (Algorithm 1 or 2, and colocated), scored by
        the fast simulators and ranked (those that fit the cluster first); ValueError when
        none meets the SLOs at any rate."""
        high = self.inputs.affinity is Affinity.HIGH
        disagg = self._algorithm1() if high else self._algorithm2()
        found = disagg + self._colocated_baseline()
        if not found and not self.num_feasible:
            raise ValueError(self._fits_nowhere())
        if not found:
            raise ValueError(
                "no configuration meets the SLOs at any rate: "
                + "; ".join(f"{c}: {', '.join(r)}" for c, r in self.rejected[:5])
            )
        return sorted(found, key=self._cluster_key)

    def cluster_key(self, cand: Candidate) -> tuple:
        """The search's ranking key (`Candidate.rank_key`), those that fit the cluster first."""
        return self._cluster_key(cand)

    def run(self) -> PlanResult:
        ranked = self.refiner.refine(self.screen())
        for cand in ranked[: self.inputs.num_predicted]:
            self._predict(cand)
        best = self._first_meeting([c for c in ranked if self._fits(c)])
        if best is not None:
            return PlanResult(self.inputs, best, ranked, self.rejected)
        return PlanResult(
            self.inputs,
            self._best_effort(ranked),
            ranked,
            self.rejected,
            best_effort=True,
            needed=self._needed(ranked),
        )

    def _fits_nowhere(self) -> str:
        """Why no instance fits, told by the largest one tried: the smaller ones fail the
        same way, only worse."""
        c = self.inputs.cluster
        return (
            f"{self.inputs.model.name} fits no instance on this cluster ({c.num_nodes} node(s) "
            f"x {c.devices_per_node} devices of {c.device_memory_gib:g} GiB); the largest "
            f"tried, {self._largest_rejected[1]}"
        )

    def _first_meeting(self, ranked: list[Candidate], at_own_rate: bool = False):
        """The first of the first ``num_predicted`` of ``ranked`` that meets the target
        simulated whole (phases scored apart can miss it together: KV transfer, a decode
        queue), at the requested rate or, ``at_own_rate``, at its own goodput; or None."""
        num_checks = 0
        for cand in ranked[: self.inputs.num_predicted]:
            self._predict(cand, cand.goodput if at_own_rate else None)
            if not cand.predicted["meets_target"]:
                continue
            if at_own_rate or num_checks == MAX_POLICY_CHECKS:
                return cand
            num_checks += 1
            if self._check_policies(cand):
                return cand
        return None

    def _check_policies(self, cand: Candidate) -> bool:
        """Whether ``cand`` also meets the target on the runtime's own schedulers
        (`planner.verify`); the check is kept in ``cand.predicted["policy_check"]``."""
        i = self.inputs
        pool = i.pool or i.workload
        workload = pool.sample(min(POLICY_CHECK_REQUESTS, i.max_requests), seed=i.seed)
        unit, rate, policy = sim_args(cand, i.rate)
        check = check_with_schedulers(
            unit, rate, policy, workload, i.slo, target=i.target, cv=i.cv, seed=i.seed
        )
        cand.predicted["policy_check"] = check.to_dict()
        if check.meets(i.target):
            return True
        cand.predicted["meets_target"] = False
        return False

    def _best_effort(self, ranked: list[Candidate]) -> Candidate:
        """The best the cluster can run: every configuration with as many replicas as the
        cluster holds, highest sustained rate first (its goodput: replicas x one replica's
        goodput; ties in `Candidate.rank_key` order), the first that meets the target at
        that rate, else the first (its ``predicted`` says it misses)."""
        num_devices = self.inputs.cluster.num_devices
        scaled = [s for s in (fit_to_cluster(c, num_devices) for c in ranked) if s is not None]
        if not scaled:
            least = min(ranked, key=lambda c: c.devices_per_prefill + c.devices_per_decode)
            raise ValueError(
                f"nothing fits the cluster: the smallest configuration, {least.label()}, "
                f"needs {least.devices_per_prefill + least.devices_per_decode} devices, "
                f"the cluster has {num_devices}"
            )
        # The user asked for a rate the cluster cannot serve: the most it can sustain first
        # (then the usual order), not the most per device.
        scaled.sort(key=lambda c: (-c.goodput, Candidate.rank_key(c)))
        best = self._first_meeting(scaled, at_own_rate=True) or scaled[0]
        self._predict(best, best.goodput)
        return best

    def _needed(self, ranked: list[Candidate]) -> Candidate:
        """What would meet the target: the best-ranked deployment at the rate, whatever
        its devices, that meets it simulated whole (else the best-ranked one)."""
        by_rank = sorted(ranked, key=Candidate.rank_key)
        needed = self._first_meeting(by_rank) or by_rank[0]
        self._predict(needed)
        return needed

    def _phase_options(self) -> dict[SimMode, list[tuple[SimInstanceSpec, float]]]:
        """Algorithm 1's building blocks: every feasible instance scored alone in each phase."""
        i, c = self.inputs, self.inputs.cluster
        found = {SimMode.PREFILL_ONLY: [], SimMode.DECODE_ONLY: []}
        configs = [
            Parallelism(tp, pp)
            for tp in divisors(i.model.num_heads, c.devices_per_node)
            for pp in divisors(i.model.num_layers, c.num_devices // tp)
            if i.max_pp is None or pp <= i.max_pp
        ]
        for par in tqdm(configs, desc="plan (algorithm 1)", disable=not i.show_progress):
            if not self._feasible(par, "instance"):
                continue
            link = c.intra_link if par.world_size <= c.devices_per_node else c.inter_link
            spec = self._instance(par, link, i.prefill_max_batch_tokens)
            for mode, options in found.items():
                g = self.phase_goodput(spec, mode, (mode, par))
                if g.rate > 0:
                    options.append((spec, g.rate))
        return found

    def _algorithm1(self) -> list[Candidate]:
        """Every (prefill, decode) instance choice, each replicated for the rate on its own."""
        i, c = self.inputs, self.inputs.cluster
        found = self._phase_options()
        out = []
        for pre, gp in found[SimMode.PREFILL_ONLY]:
            for dec, gd in found[SimMode.DECODE_ONLY]:
                n_p, n_d = num_replicas(i.rate, gp), num_replicas(i.rate, gd)
                kv = self._kv_transfer(c.inter_link, min(pre.num_devices, dec.num_devices))
                unit = DisaggSpec(pre, dec, n_p, n_d, kv)
                out.append(
                    Candidate(
                        Algorithm.PHASES_APART,
                        pre.parallelism,
                        dec.parallelism,
                        n_p,
                        n_d,
                        gp,
                        gd,
                        unit,
                    )
                )
        return out

    def _segments(self, stages: int) -> list[Parallelism]:
        """TP x PP of the instances whose pipeline crosses ``stages`` nodes, each node holding
        ``pp_size / stages`` of the stages (``tp_size × pp_size / stages`` devices)."""
        i, c = self.inputs, self.inputs.cluster
        out = []
        for tp in divisors(i.model.num_heads, c.devices_per_node):
            for pp_local in range(1, c.devices_per_node // tp + 1):
                pp = stages * pp_local
                if i.model.num_layers % pp == 0 and (i.max_pp is None or pp <= i.max_pp):
                    out.append(Parallelism(tp, pp))
        return out

    def _pair_bounds(self) -> list[tuple[int, float, int, SimInstanceSpec, SimInstanceSpec, float]]:
        """Algorithm 2's pairs with bounds from their phases alone (a pair cannot serve more
        than either of its instances): (devices needed at least, goodput per device at
        most, nodes spanned, prefill, decode, pair goodput at most)."""
        i, c = self.inputs, self.inputs.cluster
        pairs = []
        for stages in divisors(i.model.num_layers, c.num_nodes):
            segs = [
                s for s in self._segments(stages) if self._feasible(s, f"segment x{stages} nodes")
            ]
            for par_p in segs:
                for par_d in segs:
                    # Each node holds 1/stages of both instances' devices.
                    if par_p.world_size + par_d.world_size <= stages * c.devices_per_node:
                        pairs.append((stages, par_p, par_d))
        out = []
        for stages, par_p, par_d in tqdm(
            pairs, desc="plan (algorithm 2: bounds)", disable=not i.show_progress
        ):
            link = c.inter_link if stages > 1 else c.intra_link
            pre = self._instance(par_p, link, i.prefill_max_batch_tokens)
            dec = self._instance(par_d, link, i.prefill_max_batch_tokens)
            gp = self.phase_goodput(pre, SimMode.PREFILL_ONLY, ("P", par_p, stages))
            gd = self.phase_goodput(dec, SimMode.DECODE_ONLY, ("D", par_d, stages))
            bound = min(gp.rate, gd.rate)
            if bound > 0:
                devices = pre.num_devices + dec.num_devices
                least = num_replicas(i.rate, bound) * devices
                out.append((least, bound / devices, stages, pre, dec, bound))
        return out

    def _algorithm2(self) -> list[Candidate]:
        """Pairs simulated whole, most promising first, until no bound can beat the best."""
        i, c = self.inputs, self.inputs.cluster

        # A pair's bound key is at most its key (devices at least `least`, goodput per
        # device at most the bound's), so once a bound key reaches the best's key no
        # remaining pair can rank above it.
        def bound_key(b):
            least, per_device = b[0], b[1]
            return least > c.num_devices, -per_device, least

        bounds = sorted(self._pair_bounds(), key=bound_key)
        out: list[Candidate] = []
        best: Candidate | None = None
        for b in tqdm(bounds, desc="plan (algorithm 2: pairs)", disable=not i.show_progress):
            _, _, stages, pre, dec, bound = b
            if best is not None and bound_key(b) >= self._cluster_key(best)[:3]:
                break
            kv = self._kv_transfer(c.intra_link, min(pre.num_devices, dec.num_devices))
            g = self.evaluator.goodput(DisaggSpec(pre, dec, kv_transfer=kv), rate_hint=bound * 0.8)
            if g.rate <= 0:
                continue
            n = num_replicas(i.rate, g.rate)
            unit = DisaggSpec(pre, dec, n, n, kv)
            cand = Candidate(
                Algorithm.PAIRS_IN_NODES,
                pre.parallelism,
                dec.parallelism,
                n,
                n,
                g.rate,
                g.rate,
                unit,
                num_nodes_spanned=stages,
            )
            out.append(cand)
            if best is None or self._cluster_key(cand) < self._cluster_key(best):
                best = cand
        return out

    def _colocated_baseline(self) -> list[Candidate]:
        i, c = self.inputs, self.inputs.cluster
        policy = ColocatedPolicy.CONTINUOUS_BATCHING
        out = []
        for tp in divisors(i.model.num_heads, c.devices_per_node):
            par = Parallelism(tp, 1)
            if not self._feasible(par, "colocated"):
                continue
            spec = self._instance(par, c.intra_link, i.colocated_max_batch_tokens)
            g = self.evaluator.goodput(
                spec, policy=policy, rate_hint=self._hint(spec, policy=policy)
            )
            if g.rate > 0:
                n = num_replicas(i.rate, g.rate)
                out.append(Candidate(Algorithm.COLOCATED, par, None, n, 0, g.rate, g.rate, spec))
        return out


def plan(inputs: PlanInputs) -> PlanResult:
    """Run the search for ``inputs`` (Algorithm 1 or 2 by ``inputs.affinity``)."""
    return Planner(inputs).run()
