"""Stable answers (issue 15): warm-up discarded, requests grown until the attainment
interval is tight, goodput reported as an interval, and a plan that no longer changes
with the seed."""

from __future__ import annotations

import numpy as np
import pytest

from distserve_rt.config.parallelism import Parallelism
from distserve_rt.metrics.slo import SLO
from distserve_rt.models.presets import get_preset
from distserve_rt.planner.candidates import Algorithm, Candidate
from distserve_rt.planner.cluster import ClusterSpec
from distserve_rt.planner.latency_model import ConstantLatencyModel
from distserve_rt.planner.placement import PlanInputs, Planner, plan
from distserve_rt.planner.profiles import load_profile
from distserve_rt.planner.simulator import SimInstanceSpec
from distserve_rt.planner.steady_state import StableGoodput, SteadyState, batch_means
from distserve_rt.workloads import LengthDist, Workload, get_slo_preset


def test_batch_means_discards_the_warm_up():
    # The first 10% (an empty system) all meet, the rest half: the estimate is the rest's.
    met = np.r_[np.ones(100, bool), np.tile([True, False], 450)]
    est = batch_means(met, warmup_fraction=0.1, num_batches=10)
    assert est.mean == pytest.approx(0.5) and est.half_width == pytest.approx(0.0, abs=1e-3)
    assert est.num_requests == 1000
    assert batch_means(met, warmup_fraction=0.0).mean > 0.54


def test_batch_means_interval_is_wide_for_a_trend():
    # A growing queue: later batches fail more; the interval says so.
    met = np.arange(1000) < 700
    est = batch_means(met)
    assert est.half_width > 0.2 and est.low < est.mean < est.high <= 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_batches": 7}, "num_batches must be one of"),
        ({"warmup_fraction": 1.0}, r"warmup_fraction must be in \[0, 1\)"),
    ],
)
def test_batch_means_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        batch_means(np.ones(100, bool), **kwargs)


def _steady(max_requests: int = 4000) -> tuple[SteadyState, SimInstanceSpec]:
    pool = Workload.synthetic(5000, LengthDist("fixed", 100), LengthDist("uniform", low=2, high=40))
    spec = SimInstanceSpec(ConstantLatencyModel(0.02, 0.01), 10**6, max_batch_tokens=400)
    st = SteadyState(pool, SLO(0.1, 0.02), min_requests=500, max_requests=max_requests)
    return st, spec


def test_requests_grow_until_the_interval_is_tight_clear_of_the_target_or_the_cap():
    st, spec = _steady()

    def at(rate):
        return st.attainment(spec, rate, policy="continuous_batching")[0]

    easy = at(10.0)
    assert easy.num_requests == 500 and easy.half_width <= st.tolerance
    # Where 500 requests leave the target inside the interval, the run grows.
    near = [at(r) for r in (20.0, 22.0)]
    assert all(e.num_requests > 500 for e in near)
    # Far above capacity the interval is wide but clear of the target: no need to grow.
    far = [at(r) for r in (40.0, 60.0)]
    assert all(e.num_requests == 500 and e.high < st.target < 1 for e in far)
    for e in [easy, *near, *far]:
        clear = not e.low <= st.target <= e.high
        assert e.half_width <= st.tolerance or clear or e.num_requests == st.max_requests


def test_goodput_comes_with_an_interval_around_it():
    st, spec = _steady()
    g = st.goodput(spec, policy="continuous_batching", rate_hint=10.0)
    assert 0 < g.low <= g.rate <= g.high
    curve = dict((r, (m, h)) for r, m, h in g.curve)
    # The interval's ends are rates simulated: at low the whole interval meets the target,
    # at high it misses (or they are the search's last probe).
    assert curve[g.low][0] - curve[g.low][1] >= st.target or g.low < g.rate / 1.2
    assert curve[g.high][0] + curve[g.high][1] < st.target or g.high > g.rate * 1.2


def _opt175b(seed: int, num_refined: int) -> PlanInputs:
    pool = Workload.from_dataset("chat")
    return PlanInputs(
        model=get_preset("opt-175b"),
        cluster=ClusterSpec(num_nodes=4, devices_per_node=8),
        workload=pool.sample(300, seed=seed),
        slo=get_slo_preset("chatbot-opt-175b").slo,
        profile=load_profile("a100-80g-distserve"),
        rate=4.0,
        affinity="low",
        show_progress=False,
        seed=seed,
        pool=pool,
        num_refined=num_refined,
    )


@pytest.mark.slow
def test_two_seeds_choose_the_same_plan_with_overlapping_intervals():
    """The paper's largest setting at 4 req/s: with 300 requests the answer depends on the
    seed (3 x colocated tp8 for seeds 0 and 3, a 4-node pipeline pair for 1 and 2);
    refined, two seeds that disagreed choose the same, and their goodput intervals
    overlap. (The seeds are looked for, so a change in the simulator moves the case
    rather than breaking the test.)"""
    old = {seed: plan(_opt175b(seed, num_refined=0)).best.label() for seed in range(4)}
    pairs = [(a, b) for a in old for b in old if a < b and old[a] != old[b]]
    assert pairs, f"300 requests no longer disagree between seeds: {old}"
    new = [plan(_opt175b(seed, num_refined=3)) for seed in pairs[0]]
    assert new[0].best.label() == new[1].best.label()
    (a, b) = (r.predicted for r in new)
    assert a["goodput_low"] <= b["goodput_high"] and b["goodput_low"] <= a["goodput_high"]
    for r, p in zip(new, (a, b), strict=True):
        assert p["goodput_low"] <= r.best.goodput <= p["goodput_high"]
        assert p["attainment_low"] <= p["scored_attainment"] <= p["attainment_high"]
        assert p["meets_target"] and p["num_requests_simulated"] >= 1000


def _opt13b(num_refined: int = 3) -> PlanInputs:
    pool = Workload.from_dataset("chat")
    return PlanInputs(
        model=get_preset("opt-13b"),
        cluster=ClusterSpec(num_nodes=1, devices_per_node=8),
        workload=pool.sample(120, seed=0),
        slo=SLO(0.25, 0.1),
        profile=load_profile("a100-80g-distserve"),
        rate=3.0,
        affinity="high",
        show_progress=False,
        pool=pool,
        num_refined=num_refined,
        max_requests=1000,
    )


def test_refinement_goes_on_while_an_unrefined_candidate_ranks_above():
    """OPT-13B on 8 devices at 3 req/s: the first three screened (colocated tp5, tp2, tp1)
    fall below colocated tp8's screened goodput once refined, so the next ones are refined
    too, and the answer is a refined one that ranks above every unrefined one."""
    planner = Planner(_opt13b())
    result = planner.run()
    refined = [c for c in result.ranked if planner.refiner.goodput_interval(c)]
    rest = result.ranked[len(refined) :]
    assert len(refined) > 3 and not any(planner.refiner.goodput_interval(c) for c in rest)
    assert result.best in refined
    fits = [c for c in rest if c.num_devices <= 8]  # the rest that fit the cluster
    assert max(c.per_device for c in refined) >= max(c.per_device for c in fits)


def test_ties_within_the_intervals_go_to_the_fewest_devices():
    planner = Planner(_opt13b())

    def colocated(tp: int, goodput: float, low: float, high: float) -> Candidate:
        par = Parallelism(tp, 1)
        cand = Candidate(Algorithm.COLOCATED, par, None, 1, 0, goodput, goodput, None)
        stable = StableGoodput(goodput, low, high)
        planner.refiner.stable[planner.refiner.config_key(cand)] = (stable, stable)
        return cand

    # tp2 has the better mean per device (2.2 vs 2.0); its interval reaches down to 2.0
    # per device, tp1's up to 2.1: a tie, and one device beats two.
    dear, cheap = colocated(2, 4.4, 4.0, 4.8), colocated(1, 2.0, 1.9, 2.1)
    assert planner.refiner.ties_first([dear, cheap]) == [cheap, dear]
    # tp1's interval ends below 2.0 per device: no tie, the mean order stands.
    dear, cheap = colocated(2, 4.4, 4.0, 4.8), colocated(1, 1.9, 1.8, 1.95)
    assert planner.refiner.ties_first([dear, cheap]) == [dear, cheap]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_refined": -1}, "num_refined must be an int >= 0, got -1"),
        ({"max_requests": 50}, "max_requests must be an int >= 100, got 50"),
    ],
)
def test_plan_inputs_refuse_bad_refinement_settings(kwargs, match):
    import dataclasses

    with pytest.raises(ValueError, match=match):
        dataclasses.replace(_opt13b(), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_requests": 500, "max_requests": 400}, "need 0 < min_requests <= max_requests"),
        ({"tolerance": 0.0}, r"tolerance must be in \(0, 1\), got 0.0"),
        ({"growth": 1}, "growth must be an int >= 2, got 1"),
    ],
)
def test_steady_state_refuses_bad_settings(kwargs, match):
    pool = Workload.synthetic(10, LengthDist("fixed", 4), LengthDist("fixed", 2))
    with pytest.raises(ValueError, match=match):
        SteadyState(pool, SLO(1.0, 1.0), **kwargs)
