"""Placement search: the paper's Algorithm 1 (high node affinity) and Algorithm 2 (low).

Algorithm 1 (cross-node bandwidth is high, so instances may sit anywhere): search prefill
(tp, pp) and decode (tp, pp) **independently**, each scored by the per-device goodput of one
instance alone in its phase (prefill on TTFT, decode on TPOT), then replicate each to carry
the traffic rate: ``num_prefill = ceil(rate / prefill goodput)`` and likewise for decode.

Algorithm 2 (cross-node bandwidth is low): a pipeline across ``s`` nodes, each node holding
one stage's prefill segment (tp_p × pp_p devices) *and* the same stage's decode segment
(tp_d × pp_d), with ``tp_p·pp_p + tp_d·pp_d ≤ devices per node``, so every layer's KV moves
over NVLink inside a node. A (prefill, decode) pair is scored by a full simulation; pairs
whose phase-alone goodput already cannot beat the best pair found are skipped (a pair
cannot serve more than either of its instances alone). The pair is then replicated:
``n = ceil(rate / pair goodput)``.

Both also report the best colocated (vLLM-style continuous batching, TP only) instance for
reference, and verify the chosen deployment by simulating it whole at the traffic rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

from tqdm import tqdm

from distserve_rt.metrics.slo import SLO
from distserve_rt.models.config import ModelConfig
from distserve_rt.planner.cluster import ClusterSpec, build_instance, divisors, infeasibility
from distserve_rt.planner.goodput import GoodputEvaluator, GoodputResult
from distserve_rt.planner.profiles import ProfileSet
from distserve_rt.planner.simulator import (
    ColocatedPolicy,
    DisaggSpec,
    InstanceSpec,
    KVTransferSpec,
    SimMode,
)
from distserve_rt.workloads.workload import Workload


class Affinity(str, Enum):
    HIGH = "high"
    LOW = "low"


@dataclass(frozen=True)
class PlanInputs:
    model: ModelConfig
    cluster: ClusterSpec
    workload: Workload
    """Requests the simulator replays (sample a few hundred for speed)."""
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
    show_progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "affinity", Affinity(self.affinity))
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0 req/s, got {self.rate!r}")


@dataclass
class Candidate:
    """One scored configuration (a row of the ranked table)."""

    placement: str  # "disaggregated" | "colocated"
    prefill: tuple[int, int]  # (tp, pp); colocated: the instance
    decode: tuple[int, int] | None
    num_devices: int
    """Devices of one unit (an instance pair, or one colocated instance)."""
    goodput: GoodputResult
    spec: DisaggSpec | InstanceSpec = field(repr=False)
    predicted: dict[str, object] = field(default_factory=dict)

    @property
    def per_device(self) -> float:
        return self.goodput.rate / self.num_devices

    def label(self) -> str:
        if self.placement == "colocated":
            return f"colocated tp{self.prefill[0]}pp{self.prefill[1]}"
        (tp_p, pp_p), (tp_d, pp_d) = self.prefill, self.decode
        return f"P tp{tp_p}pp{pp_p} + D tp{tp_d}pp{pp_d}"


@dataclass
class PlanResult:
    inputs: PlanInputs
    best: Candidate
    num_prefill: int
    num_decode: int
    ranked: list[Candidate]
    """Best first: disaggregated candidates and the colocated baseline."""
    rejected: list[tuple[str, list[str]]]
    """(config, reasons) of configurations that cannot run."""
    predicted: dict[str, object]
    """Whole deployment simulated at the traffic rate: attainment and percentiles."""

    @property
    def num_devices(self) -> int:
        b = self.best
        return (
            self.num_prefill * b.spec.prefill.num_devices
            + self.num_decode * b.spec.decode.num_devices
        )


class Planner:
    def __init__(self, inputs: PlanInputs) -> None:
        self.inputs = inputs
        self.evaluator = GoodputEvaluator(
            inputs.workload, inputs.slo, inputs.target, inputs.rel_tol, seed=inputs.seed
        )
        self.rejected: list[tuple[str, list[str]]] = []
        self._phase_cache: dict[tuple, GoodputResult] = {}

    # ---- building blocks ---------------------------------------------------------------

    def _instance(self, tp: int, pp: int, stage_link, max_batch_tokens: int) -> InstanceSpec:
        i = self.inputs
        return build_instance(
            i.model,
            tp,
            pp,
            cluster=i.cluster,
            profile=i.profile,
            stage_link=stage_link,
            max_batch_tokens=max_batch_tokens,
        )

    def _feasible(self, tp: int, pp: int, label: str, max_tp: int | None = None) -> bool:
        i = self.inputs
        reasons = infeasibility(
            i.model, tp, pp, i.cluster, i.profile.hardware, i.workload.max_seq_len(), max_tp
        )
        if reasons:
            self.rejected.append((f"{label} tp{tp}pp{pp}", reasons))
        return not reasons

    def _kv_transfer(self, link, num_streams: int) -> KVTransferSpec:
        per_token = self.inputs.model.kv_bytes_per_token() / (
            link.bandwidth_bytes_per_s * num_streams
        )
        return KVTransferSpec(per_token, link.latency_s)

    def _hint(self, spec) -> float:
        """A starting rate near the answer: saves bracketing steps."""
        bound = self.evaluator.decode_rate_bound(spec)
        return max(0.05, 0.5 * bound) if math.isfinite(bound) else 1.0

    def phase_goodput(self, spec: InstanceSpec, mode: SimMode, key: tuple) -> GoodputResult:
        if key not in self._phase_cache:
            hint = 1.0 if mode is SimMode.PREFILL_ONLY else self._hint(spec)
            self._phase_cache[key] = self.evaluator.goodput(spec, mode=mode, rate_hint=hint)
        return self._phase_cache[key]

    # ---- algorithms -----------------------------------------------------------------------

    def run(self) -> PlanResult:
        if self.inputs.affinity is Affinity.HIGH:
            ranked, n_p, n_d = self._algorithm1()
        else:
            ranked, n_p, n_d = self._algorithm2()
        colocated = self._colocated_baseline()
        disagg = [c for c in ranked if c.goodput.rate > 0]
        if not disagg:
            raise ValueError(
                "no disaggregated configuration meets the SLOs at any rate: "
                + "; ".join(f"{c}: {', '.join(r)}" for c, r in self.rejected[:5])
            )
        best = max(disagg, key=lambda c: c.per_device)
        n_p, n_d = n_p(best), n_d(best)
        all_ranked = sorted(disagg + colocated, key=lambda c: c.per_device, reverse=True)
        for cand in all_ranked[:5]:
            cand.predicted = self._predict(cand.spec, cand.goodput.rate, cand.placement)
        deployment = DisaggSpec(
            best.spec.prefill, best.spec.decode, n_p, n_d, best.spec.kv_transfer
        )
        predicted = self._predict(deployment, self.inputs.rate, "disaggregated")
        return PlanResult(self.inputs, best, n_p, n_d, all_ranked, self.rejected, predicted)

    def _predict(self, spec, rate: float, placement: str) -> dict[str, object]:
        if rate <= 0:
            return {}
        policy = ColocatedPolicy.CONTINUOUS_BATCHING if placement == "colocated" else None
        result = self.evaluator.simulate(spec, rate, policy=policy)
        return {"rate": rate, **result.summary(self.inputs.slo).to_dict()}

    def _algorithm1(self):
        i, c = self.inputs, self.inputs.cluster
        found: dict[SimMode, list[tuple[int, int, InstanceSpec, GoodputResult]]] = {
            SimMode.PREFILL_ONLY: [],
            SimMode.DECODE_ONLY: [],
        }
        configs = [
            (tp, pp)
            for tp in divisors(i.model.num_heads, c.devices_per_node)
            for pp in divisors(i.model.num_layers, c.num_devices // tp)
        ]
        for tp, pp in tqdm(configs, desc="plan (algorithm 1)", disable=not i.show_progress):
            if not self._feasible(tp, pp, "instance"):
                continue
            link = c.intra_link if tp * pp <= c.devices_per_node else c.inter_link
            spec = self._instance(tp, pp, link, i.prefill_max_batch_tokens)
            for mode in found:
                g = self.phase_goodput(spec, mode, (mode, tp, pp))
                if g.rate > 0:
                    found[mode].append((tp, pp, spec, g))
        # Best mix whose one prefill + one decode instance fits the cluster; per-device
        # goodput of the mix carrying rate r is r / (r/gp·dev_p + r/gd·dev_d).
        pairs = [
            (1.0 / (p[2].num_devices / p[3].rate + d[2].num_devices / d[3].rate), p, d)
            for p in found[SimMode.PREFILL_ONLY]
            for d in found[SimMode.DECODE_ONLY]
            if p[2].num_devices + d[2].num_devices <= c.num_devices
        ]
        if not pairs:
            return [], None, None
        per_dev, (tp_p, pp_p, pre, gp), (tp_d, pp_d, dec, gd) = max(pairs, key=lambda x: x[0])
        streams = min(pre.num_devices, dec.num_devices)
        spec = DisaggSpec(pre, dec, kv_transfer=self._kv_transfer(c.inter_link, streams))
        unit = GoodputResult(
            per_dev * (pre.num_devices + dec.num_devices),
            pre.num_devices + dec.num_devices,
            gp.num_simulations + gd.num_simulations,
            (),
        )
        cand = Candidate("disaggregated", (tp_p, pp_p), (tp_d, pp_d), unit.num_devices, unit, spec)
        return (
            [cand],
            lambda _: math.ceil(i.rate / gp.rate),
            lambda _: math.ceil(i.rate / gd.rate),
        )

    def _segments(self, stages: int) -> list[tuple[int, int]]:
        """(tp, pp inside a node) segments of one node for a pipeline over ``stages`` nodes."""
        i, c = self.inputs, self.inputs.cluster
        out = []
        for tp in divisors(i.model.num_heads, c.devices_per_node):
            for pp_local in range(1, c.devices_per_node // tp + 1):
                if i.model.num_layers % (stages * pp_local) == 0:
                    out.append((tp, pp_local))
        return out

    def _algorithm2(self):
        i, c = self.inputs, self.inputs.cluster
        pairs = []
        for stages in divisors(i.model.num_layers, c.num_nodes):
            segs = [
                s
                for s in self._segments(stages)
                if self._feasible(s[0], stages * s[1], f"segment x{stages} nodes")
            ]
            for tp_p, lp in segs:
                for tp_d, ld in segs:
                    if tp_p * lp + tp_d * ld <= c.devices_per_node:
                        pairs.append((stages, tp_p, stages * lp, tp_d, stages * ld))
        scored = []
        for stages, tp_p, pp_p, tp_d, pp_d in tqdm(
            pairs, desc="plan (algorithm 2: bounds)", disable=not i.show_progress
        ):
            link = c.inter_link if stages > 1 else c.intra_link
            pre = self._instance(tp_p, pp_p, link, i.prefill_max_batch_tokens)
            dec = self._instance(tp_d, pp_d, link, i.prefill_max_batch_tokens)
            gp = self.phase_goodput(pre, SimMode.PREFILL_ONLY, ("P", tp_p, pp_p, stages))
            gd = self.phase_goodput(dec, SimMode.DECODE_ONLY, ("D", tp_d, pp_d, stages))
            devices = pre.num_devices + dec.num_devices
            scored.append((min(gp.rate, gd.rate) / devices, pre, dec, devices))
        scored.sort(key=lambda s: s[0], reverse=True)
        ranked, best = [], 0.0
        for bound, pre, dec, devices in tqdm(
            scored, desc="plan (algorithm 2: pairs)", disable=not i.show_progress
        ):
            if bound <= best:
                break  # sorted by bound: no remaining pair can beat the best
            kv = self._kv_transfer(c.intra_link, min(pre.num_devices, dec.num_devices))
            spec = DisaggSpec(pre, dec, kv_transfer=kv)
            g = self.evaluator.goodput(spec, rate_hint=bound * devices * 0.8)
            cand = Candidate("disaggregated", (pre.tp, pre.pp), (dec.tp, dec.pp), devices, g, spec)
            ranked.append(cand)
            best = max(best, cand.per_device)
        n = lambda cand: math.ceil(i.rate / cand.goodput.rate)  # noqa: E731
        return ranked, n, n

    def _colocated_baseline(self) -> list[Candidate]:
        i, c = self.inputs, self.inputs.cluster
        out = []
        for tp in divisors(i.model.num_heads, c.devices_per_node):
            if not self._feasible(tp, 1, "colocated"):
                continue
            spec = self._instance(tp, 1, c.intra_link, i.colocated_max_batch_tokens)
            g = self.evaluator.goodput(
                spec, policy=ColocatedPolicy.CONTINUOUS_BATCHING, rate_hint=self._hint(spec)
            )
            if g.rate > 0:
                out.append(Candidate("colocated", (tp, 1), None, tp, g, spec))
        return out


def plan(inputs: PlanInputs) -> PlanResult:
    """Run the search for ``inputs`` (Algorithm 1 or 2 by ``inputs.affinity``)."""
    return Planner(inputs).run()
