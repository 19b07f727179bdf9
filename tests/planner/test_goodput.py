"""Goodput search: steady-state throughput bounds keep finite runs from overstating it."""

from __future__ import annotations

import numpy as np
import pytest

from distserve_rt.config.parallelism import Parallelism
from distserve_rt.metrics.slo import SLO
from distserve_rt.planner.goodput import GoodputEvaluator
from distserve_rt.planner.instance_timing import Link, PipelineTiming
from distserve_rt.planner.latency_model import ConstantLatencyModel
from distserve_rt.planner.simulator import SimInstanceSpec, SimMode
from distserve_rt.workloads import LengthDist, Workload


def _pp_prefill(pp: int, step_s: float = 0.1) -> SimInstanceSpec:
    pipe = PipelineTiming(pp, hidden_size=1, link=Link(1e30, 0.0)) if pp > 1 else None
    return SimInstanceSpec(
        ConstantLatencyModel(step_s, 0.01),
        10**6,
        parallelism=Parallelism(1, pp),
        pipeline=pipe,
        max_batch_tokens=100,
    )


@pytest.mark.parametrize("pp", [1, 2, 4])
def test_prefill_rate_bound_is_pipeline_throughput(pp):
    # One 100-token prompt per batch (L_m = 100), 0.1 s a batch, 0.1/pp s on each stage.
    w = Workload.synthetic(100, LengthDist("fixed", 100), LengthDist("fixed", 2))
    ev = GoodputEvaluator(w, SLO(10.0, 1.0))
    assert ev.prefill_rate_bound(_pp_prefill(pp)) == pytest.approx(10.0 * pp)


def test_prefill_goodput_of_a_short_run_stays_below_throughput():
    # TTFT SLO 10 s: 100 requests at 4x the throughput clear in 10 s, so without the bound
    # a finite run passes rates the instance can never sustain.
    w = Workload.synthetic(100, LengthDist("fixed", 100), LengthDist("fixed", 2))
    ev = GoodputEvaluator(w, SLO(10.0, 1.0), rel_tol=0.02)
    spec = _pp_prefill(2)
    g = ev.goodput(spec, mode=SimMode.PREFILL_ONLY, rate_hint=1.0)
    assert 0.9 * 20.0 <= g.rate <= 20.0
    assert all(a == 0.0 for r, a in g.curve if r > 20.0)


def test_prefill_rate_bound_counts_long_prompts_as_their_own_batches():
    # Prompts 300 (> L_m = 100, alone) and 50 (two to a batch): 2 prompts of each per 3
    # batches of 0.1 s -> 4 requests per 0.3 s.
    lens = np.array([300, 50, 300, 50])
    w = Workload("mixed", lens, np.full(4, 2))
    ev = GoodputEvaluator(w, SLO(1.0, 1.0))
    assert ev.prefill_rate_bound(_pp_prefill(1)) == pytest.approx(4 / 0.3)


def test_colocated_bound_adds_prefill_and_decode_time():
    # One seat: each request takes a 0.1 s prefill step, then 10 decode steps of 0.01 s on
    # the same device, 0.2 s in all: 5 req/s, though each phase alone could do 10.
    w = Workload.synthetic(100, LengthDist("fixed", 100), LengthDist("fixed", 11))
    ev = GoodputEvaluator(w, SLO(100.0, 100.0), rel_tol=0.02)
    spec = SimInstanceSpec(
        ConstantLatencyModel(0.1, 0.01), 10**6, max_batch_tokens=100, max_num_seqs=1
    )
    assert ev.rate_bound(spec, policy="continuous_batching") == pytest.approx(5.0)
    assert ev.rate_bound(spec, policy="chunked_prefill") == pytest.approx(10.0)
    g = ev.goodput(spec, policy="continuous_batching", rate_hint=1.0)
    assert 0.9 * 5.0 <= g.rate <= 5.0
