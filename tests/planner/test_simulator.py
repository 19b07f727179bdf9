"""Simulator checks: M/D/1 queueing formulas (DistServe §3.1), invariants, paper direction."""

from __future__ import annotations

import numpy as np
import pytest

from distserve_rt.config.parallelism import Parallelism
from distserve_rt.metrics.slo import SLO, attainment, slo_scale
from distserve_rt.planner.instance_timing import Link, PipelineTiming
from distserve_rt.planner.latency_model import ConstantLatencyModel
from distserve_rt.planner.simulator import (
    ColocatedSimulator,
    DisaggregatedSimulator,
    DisaggSpec,
    KVTransferSpec,
    SimInstanceSpec,
    SimMode,
)
from distserve_rt.workloads import arrival_times

NUM = 40000
D = 0.1  # prefill time of one request, s
RATE = 4.0  # req/s: utilisation R·D = 0.4 on one device


def _mean_ttft(spec: SimInstanceSpec) -> float:
    arrival = arrival_times(NUM, RATE, seed=1)
    lens = np.full(NUM, 100)
    sim = DisaggregatedSimulator(DisaggSpec(spec, spec), SimMode.PREFILL_ONLY)
    return float(sim.run(arrival, lens, np.full(NUM, 2)).ttft.mean())


def test_md1_single_device():
    # L_m below two prompts: no batching.
    spec = SimInstanceSpec(ConstantLatencyModel(D, 0.01), 10**6, max_batch_tokens=100)
    want = D + RATE * D**2 / (2 * (1 - RATE * D))
    assert _mean_ttft(spec) == pytest.approx(want, rel=0.02)


def test_md1_two_way_inter_op():
    # Two stages of D/2 each, free hops: the queue sees D_m = D/2, a request spends D_s = D.
    pipe = PipelineTiming(2, hidden_size=1, link=Link(1e30, 0.0))
    spec = SimInstanceSpec(
        ConstantLatencyModel(D, 0.01),
        10**6,
        parallelism=Parallelism(1, 2),
        pipeline=pipe,
        max_batch_tokens=100,
    )
    want = D + RATE * D**2 / (4 * (2 - RATE * D))
    assert _mean_ttft(spec) == pytest.approx(want, rel=0.02)


@pytest.mark.parametrize("speedup", [1.6, 2.0])
def test_md1_two_way_intra_op(speedup):
    spec = SimInstanceSpec(
        ConstantLatencyModel(D / speedup, 0.01, tp=2),
        10**6,
        parallelism=Parallelism(2, 1),
        max_batch_tokens=100,
    )
    want = D / speedup + RATE * D**2 / (2 * speedup * (speedup - RATE * D))
    assert _mean_ttft(spec) == pytest.approx(want, rel=0.02)


def test_disaggregated_breakdown_adds_up_and_decode_tpot():
    pre = SimInstanceSpec(ConstantLatencyModel(0.05, 0.02), 10**6)
    dec = SimInstanceSpec(ConstantLatencyModel(0.05, 0.02), 10**6)
    spec = DisaggSpec(
        pre, dec, num_prefill=2, num_decode=2, kv_transfer=KVTransferSpec(1e-5, 0.001)
    )
    n = 300
    arrival = arrival_times(n, 5.0, seed=0)
    prompt = np.random.default_rng(0).integers(10, 500, n)
    out = np.random.default_rng(1).integers(1, 50, n)
    res = DisaggregatedSimulator(spec).run(arrival, prompt, out)
    parts = res.breakdown()
    total = sum(parts.values())
    np.testing.assert_allclose(total, res.finish - res.arrival, atol=1e-9)
    for name, v in parts.items():
        assert (v >= -1e-12).all(), name
    # Light load, constant 20 ms steps: TPOT is the step time once decoding.
    multi = out > 1
    np.testing.assert_allclose(res.finish[multi] - res.decode_start[multi], 0.02 * (out[multi] - 1))
    assert np.isfinite(res.finish).all()


def test_requests_that_never_fit_fail_instead_of_hanging():
    spec = SimInstanceSpec(ConstantLatencyModel(0.01, 0.01), 200)
    arrival = np.array([0.0, 0.1])
    res = DisaggregatedSimulator(DisaggSpec(spec, spec)).run(arrival, [50, 150], [10, 100])
    assert np.isfinite(res.finish[0]) and np.isinf(res.finish[1])
    col = ColocatedSimulator(spec, "continuous_batching").run(arrival, [50, 150], [10, 100])
    assert np.isfinite(col.finish[0]) and np.isinf(col.finish[1])


@pytest.mark.parametrize("policy", ["continuous_batching", "chunked_prefill"])
def test_colocated_policies_finish_everything(policy):
    spec = SimInstanceSpec(ConstantLatencyModel(0.05, 0.02), 5000, max_batch_tokens=256)
    n = 200
    arrival = arrival_times(n, 3.0, seed=0)
    prompt = np.random.default_rng(0).integers(10, 600, n)
    out = np.random.default_rng(1).integers(1, 40, n)
    res = ColocatedSimulator(spec, policy).run(arrival, prompt, out)
    assert np.isfinite(res.finish).all()
    assert (res.prefill_end >= res.arrival).all() and (res.finish >= res.prefill_end).all()


def test_slo_metrics():
    ttft = np.array([0.1, 0.2, 0.3, 0.4])
    tpot = np.array([0.01, 0.05, 0.01, 0.01])
    a = attainment(ttft, tpot, SLO(0.3, 0.02))
    assert (a.joint, a.ttft, a.tpot) == (0.5, 0.75, 0.75)
    # 75% need max(ttft/0.3, tpot/0.02) <= s: ratios 0.33, 2.5, 1.0, 1.33 -> third smallest.
    assert slo_scale(ttft, tpot, SLO(0.3, 0.02), 0.75) == pytest.approx(4 / 3)


def test_decode_only_one_token_output_finishes_at_arrival():
    # Request 0 decodes with 1 s steps in the only seat; request 1 arrives prefilled at 0.5 s
    # with nothing left to decode: it must neither wait for a step boundary nor a seat.
    spec = SimInstanceSpec(ConstantLatencyModel(0.01, 1.0), 10**4, max_num_seqs=1)
    sim = DisaggregatedSimulator(DisaggSpec(spec, spec), SimMode.DECODE_ONLY)
    res = sim.run(np.array([0.0, 0.5]), [10, 10], [5, 1])
    assert res.finish[1] == res.decode_start[1] == 0.5
    assert res.finish[0] == pytest.approx(4.0)


def test_instance_spec_parallelism_must_match_its_latency_model_and_pipeline():
    two_way = ConstantLatencyModel(0.01, 0.01, tp=2)
    spec = SimInstanceSpec(two_way, 1000, parallelism=Parallelism(2, 1))
    assert spec.num_devices == 2
    # The default (tp=1, pp=1) would time a TP=2 model on one device.
    with pytest.raises(ValueError, match=r"parallelism.tp_size \(1\) must equal .* tp \(2\)"):
        SimInstanceSpec(two_way, 1000)
    with pytest.raises(ValueError, match=r"pipeline.pp \(1\) must equal parallelism.pp_size \(2\)"):
        SimInstanceSpec(ConstantLatencyModel(0.01, 0.01), 1000, parallelism=Parallelism(1, 2))
    with pytest.raises(ValueError, match=r"parallelism must be a Parallelism, got 2"):
        SimInstanceSpec(ConstantLatencyModel(0.01, 0.01), 1000, parallelism=2)


def test_colocated_simulator_names_the_parallelism_it_refuses():
    pipe = PipelineTiming(2, hidden_size=1, link=Link(1e30, 0.0))
    spec = SimInstanceSpec(
        ConstantLatencyModel(0.01, 0.01), 1000, parallelism=Parallelism(1, 2), pipeline=pipe
    )
    with pytest.raises(NotImplementedError, match="pp=1 only, got tp=1, pp=2"):
        ColocatedSimulator(spec, "continuous_batching")
