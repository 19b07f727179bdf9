"""The plan's answer re-run on the runtime's own schedulers (planner/verify.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from distserve_rt.config.parallelism import Parallelism
from distserve_rt.metrics.slo import SLO
from distserve_rt.models.presets import get_preset
from distserve_rt.planner import placement as placement_mod
from distserve_rt.planner.cluster import ClusterSpec, build_instance
from distserve_rt.planner.goodput import GoodputEvaluator
from distserve_rt.planner.placement import PlanInputs, Planner, plan
from distserve_rt.planner.profiles import load_profile
from distserve_rt.planner.simulator import (
    ColocatedPolicy,
    DisaggSpec,
    SchedulerDrivenColocated,
)
from distserve_rt.planner.steady_state import Estimate, batch_means
from distserve_rt.planner.verify import PolicyCheck, check_with_schedulers
from distserve_rt.workloads import Workload

SLO_ = SLO(0.4, 0.1)


def _instance(tp: int = 1, pp: int = 1, budget: int = 2048):
    cluster = ClusterSpec()
    return build_instance(
        get_preset("opt-13b"),
        Parallelism(tp, pp),
        cluster=cluster,
        profile=load_profile("a100-80g-distserve"),
        stage_link=cluster.intra_link,
        max_batch_tokens=budget,
    )


def test_the_check_is_the_scheduler_driven_run_scored_after_its_warm_up():
    w = Workload.from_dataset("chat").sample(400, seed=3)
    spec = _instance()
    check = check_with_schedulers(
        spec, 1.5, ColocatedPolicy.CONTINUOUS_BATCHING, w, SLO_, target=0.9, seed=3
    )
    ev = GoodputEvaluator(w, SLO_, 0.9, seed=3)
    sim = SchedulerDrivenColocated(spec, ColocatedPolicy.CONTINUOUS_BATCHING, seed=3)
    result = sim.run(ev.arrivals(1.5), w.prompt_lens, w.output_lens)
    expected = batch_means(ev.met(result))
    assert check.estimate == expected
    assert check.to_dict()["attainment"] == expected.mean
    assert check.meets(expected.mean) and not check.meets(expected.mean + 1e-9)


def test_pp_deployments_are_said_to_be_unchecked_not_passed_silently():
    pre, dec = _instance(pp=2, budget=512), _instance()
    check = check_with_schedulers(
        DisaggSpec(pre, dec), 1.0, None, Workload.from_dataset("chat").sample(200), SLO_,
        target=0.9,
    )  # fmt: skip
    assert check.estimate is None and "pp=2" in check.reason
    assert check.to_dict() == {"checked": False, "reason": check.reason}
    assert check.meets(0.9)  # the search's estimate stands, and the plan says so


def _plan_inputs() -> PlanInputs:
    return PlanInputs(
        model=get_preset("opt-13b"),
        cluster=ClusterSpec(num_nodes=1, devices_per_node=4),
        workload=Workload.from_dataset("chat").sample(120, seed=0),
        slo=SLO(0.25, 0.1),
        profile=load_profile("a100-80g-distserve"),
        rate=2.0,
        show_progress=False,
        max_requests=1000,
    )


def test_a_deployment_the_runtime_schedulers_fail_is_not_chosen(monkeypatch):
    checked = []

    def failing_first(unit, rate, policy, workload, slo, **kw):
        checked.append(unit)
        mean = 0.5 if len(checked) == 1 else 0.99
        return PolicyCheck(Estimate(mean, 0.01, workload.num_requests))

    monkeypatch.setattr(placement_mod, "check_with_schedulers", failing_first)
    result = plan(_plan_inputs())
    assert len(checked) == 2
    first = next(
        c for c in result.ranked if c.predicted.get("policy_check", {}).get("attainment") == 0.5
    )
    assert first is not result.best and first.predicted["meets_target"] is False
    assert result.best.predicted["policy_check"]["attainment"] == 0.99
    assert result.best.predicted["meets_target"] and not result.best_effort


def test_the_plan_records_the_check_of_its_answer():
    result = plan(_plan_inputs())
    check = result.best.predicted["policy_check"]
    assert check["checked"] and check["num_requests"] == 1000
    assert check["attainment"] >= 0.9
    assert 0 <= check["attainment_low"] <= check["attainment"] <= check["attainment_high"] <= 1
    assert np.isfinite(check["attainment"])


@pytest.mark.parametrize(
    "check", [PolicyCheck(reason="pp=2: x"), PolicyCheck(Estimate(0.95, 0.02, 1000))]
)
def test_plan_prints_the_check(check):
    from distserve_rt.entrypoints.plan import _policy_check_line

    line = _policy_check_line(check.to_dict())
    assert ("not checked" in line) == (check.estimate is None)
    assert "95.0%" in line or "pp=2" in line


@pytest.mark.parametrize("affinity", ["low", "high"])
def test_max_pp_keeps_the_search_to_those_pipelines(affinity):
    """A multi-turn plan screens pp = 1 only (its rescoring simulator runs nothing else):
    without the limit, Algorithm 2's pruning stopped at PP pairs and left no disaggregated
    configuration to rescore."""
    base = dataclasses.replace(_plan_inputs(), affinity=affinity, rate=40.0)
    assert any(
        c.prefill.pp_size > 1 or (c.decode is not None and c.decode.pp_size > 1)
        for c in Planner(base).screen()
    )
    screened = Planner(dataclasses.replace(base, max_pp=1)).screen()
    assert screened and all(
        c.prefill.pp_size == 1 and (c.decode is None or c.decode.pp_size == 1) for c in screened
    )
    with pytest.raises(ValueError, match="max_pp must be None or an int >= 1, got 0"):
        dataclasses.replace(base, max_pp=0)
