"""The plan's answer checked against the runtime's own policies.

The search ranks thousands of configurations with the fast simulators, which re-state the
policies analytically (they reserve prompt + output tokens of KV and never preempt). The
runtime admits on the prompt above a watermark and preempts by recompute when blocks run
out: under memory pressure the two part (`planner/simulator/driven_instance.py`). So the
deployment the plan is about to choose is simulated once more with the scheduler-driven
simulator (the runtime's `core` schedulers on a simulated clock), at the asked rate, and
the plan only chooses it if that run meets the target too.

PP instances are not checked (the scheduler-driven simulator runs pp=1 only); the result
says so rather than pretending.
"""

from __future__ import annotations

from dataclasses import dataclass

from distserve_rt.metrics.slo import SLO
from distserve_rt.planner.goodput import GoodputEvaluator
from distserve_rt.planner.simulator import (
    ColocatedPolicy,
    DisaggSpec,
    SchedulerDrivenColocated,
    SchedulerDrivenDisaggregated,
    SimInstanceSpec,
)
from distserve_rt.planner.steady_state import Estimate, batch_means
from distserve_rt.workloads import Workload


@dataclass(frozen=True)
class PolicyCheck:
    """One deployment simulated with the runtime's schedulers at one rate."""

    estimate: Estimate | None = None
    """Attainment after the warm-up, with its 95% interval (as the refined search's)."""
    reason: str = ""

    def meets(self, target: float) -> bool:
        """Unchecked deployments pass (the search's estimate stands, and says so)."""
        return self.estimate is None or self.estimate.mean >= target

    def to_dict(self) -> dict[str, object]:
        if self.estimate is None:
            return {"checked": False, "reason": self.reason}
        e = self.estimate
        return {
            "checked": True,
            "attainment": e.mean,
            "attainment_low": e.low,
            "attainment_high": e.high,
            "num_requests": e.num_requests,
        }


def check_with_schedulers(
    unit: DisaggSpec | SimInstanceSpec,
    rate: float,
    policy: ColocatedPolicy | None,
    workload: Workload,
    slo: SLO,
    *,
    target: float,
    cv: float = 1.0,
    seed: int = 0,
) -> PolicyCheck:
    """``unit`` (a colocated instance under ``policy``, or a disaggregated deployment)
    carrying ``rate`` req/s of ``workload``'s requests, on the runtime's schedulers."""
    specs = [unit] if isinstance(unit, SimInstanceSpec) else [unit.prefill, unit.decode]
    pps = [s.parallelism.pp_size for s in specs]
    if max(pps) > 1:
        return PolicyCheck(
            reason=f"pp={max(pps)}: the runtime's schedulers are simulated at pp=1 only"
        )
    evaluator = GoodputEvaluator(workload, slo, target, cv=cv, seed=seed)
    if isinstance(unit, SimInstanceSpec):
        assert policy is not None, "a colocated instance needs its policy"
        sim = SchedulerDrivenColocated(unit, policy, seed=seed)
    else:
        sim = SchedulerDrivenDisaggregated(unit, seed=seed)
    result = sim.run(evaluator.arrivals(rate), workload.prompt_lens, workload.output_lens)
    return PolicyCheck(batch_means(evaluator.met(result)))
