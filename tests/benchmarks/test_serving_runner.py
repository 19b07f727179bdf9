"""The runner and in-process backend against a fake engine: two rates, failures, timeouts,
and the goodput search over measured runs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distserve_rt.benchmarks.serving import (
    BenchSettings,
    EventLoop,
    InProcessBackend,
    ServingBenchmark,
    build_requests,
    run_requests,
)
from distserve_rt.benchmarks.serving.report import RunInfo
from distserve_rt.benchmarks.serving.sweep import BenchmarkAborted, sweep_json
from distserve_rt.metrics.slo import SLO
from distserve_rt.workloads import LengthDist, Workload
from tests.benchmarks.fake_engine import FakeEngine

WORKLOAD = Workload("tiny", np.array([5, 9, 3, 7, 4, 6]), np.array([4, 2, 6, 1, 3, 5]))


LOOSE_SLO = SLO(0.5, 0.5)


def make_bench(engine, *, slo=LOOSE_SLO, timeout_s=None, workload=WORKLOAD):
    info = RunInfo("distserve_rt", engine.model_name, "dummy", "fake", math.inf, 1.0, None, 0)
    return ServingBenchmark(
        InProcessBackend(engine),
        workload,
        info,
        BenchSettings(slo, target=0.9, timeout_s=timeout_s, disable_tqdm=True),
        vocab_size=512,
        special_ids=[0, 1, 2],
        max_model_len=engine.max_model_len,
        loop=EventLoop(),
    )


def test_runs_at_two_rates_with_forced_lengths():
    engine = FakeEngine(ttft_s=0.004, per_token_s=0.002)
    bench = make_bench(engine)
    try:
        slow, burst = bench.run_at(200.0), bench.run_at(math.inf)
    finally:
        bench.loop.close()
    for run in (slow, burst):
        m = run.metrics
        assert (m.completed, m.failed) == (6, 0)
        assert run.result["output_lens"] == WORKLOAD.output_lens.tolist()
        assert m.ttft.median >= 4.0
        assert m.attainment.joint == 1.0
        # One ITL gap per token after the first (the fake yields one token at a time).
        assert [len(x) for x in run.result["itls"]] == (WORKLOAD.output_lens - 1).tolist()
        assert run.result["engine_breakdown_ms"]["mean_ttft_ms"] == pytest.approx(4.0)
    # Every request was forced: ignore_eos and max_tokens = min_tokens = output_len.
    _, ids, params = engine.received[0]
    assert params.ignore_eos and params.max_tokens == params.min_tokens == 4 and len(ids) == 5
    # The rate shapes the sends: 6 requests at 200 req/s take longer to send than a burst.
    assert max(slow.result["start_times"]) > max(burst.result["start_times"])
    assert max(burst.result["start_times"]) < 0.05
    summary = sweep_json(bench, None, {"git_commit": "x"})
    assert [r["request_rate"] for r in summary["runs"]] == [200.0, "inf"]


def test_failures_are_counted_not_raised():
    engine = FakeEngine(fail_ids=frozenset({"bench-0"}), reject_ids=frozenset({"bench-2"}))
    bench = make_bench(engine)
    try:
        run = bench.run_at(math.inf)
    finally:
        bench.loop.close()
    assert (run.metrics.completed, run.metrics.failed) == (4, 2)
    errors = run.result["errors"]
    assert errors[0] == "fake failure" and errors[2].startswith("EngineOverloadedError")
    assert run.metrics.attainment.joint == pytest.approx(4 / 6)
    assert run.result["output_lens"][0] == 0


def test_timeout_fails_the_request_and_aborts_it():
    engine = FakeEngine(hang_ids=frozenset({"bench-1"}))
    loop = EventLoop()
    try:
        rs = build_requests(
            WORKLOAD, rate=math.inf, vocab_size=512, special_ids=[0], max_model_len=256
        )
        out = loop.run(run_requests(InProcessBackend(engine), rs, timeout_s=0.2, disable_tqdm=True))
    finally:
        loop.close()
    assert [r.success for r in out.records] == [True, False, True, True, True, True]
    assert out.records[1].error == "timed out after 0.2 s"
    assert engine.aborted == ["bench-1"]
    assert 0.2 <= out.duration_s < 1.0


def test_max_concurrency_serialises_requests():
    engine = FakeEngine(ttft_s=0.01, per_token_s=0.0)
    loop = EventLoop()
    try:
        rs = build_requests(
            WORKLOAD, rate=math.inf, vocab_size=512, special_ids=[0], max_model_len=64
        )
        out = loop.run(
            run_requests(InProcessBackend(engine), rs, max_concurrency=1, disable_tqdm=True)
        )
    finally:
        loop.close()
    starts = sorted(r.start_time for r in out.records)
    assert all(b - a >= 0.009 for a, b in zip(starts, starts[1:], strict=False))


def test_goodput_search_doubles_up_to_max_rate_when_nothing_misses():
    bench = make_bench(FakeEngine(ttft_s=0.002, per_token_s=0.001))
    try:
        result = bench.goodput_search(num_devices=2, rate_hint=50.0, max_rate=400.0)
    finally:
        bench.loop.close()
    assert result.rate == 400.0 and result.per_device == 200.0
    assert [r for r, _ in result.curve] == [50.0, 100.0, 200.0, 400.0]
    assert all(r.source == "search" for r in bench.runs)


def test_goodput_search_finds_a_measured_rate_below_a_serial_engines_capacity():
    # One request at a time, ~8 ms each: capacity ~125 req/s; TTFT queues up past it.
    engine = FakeEngine(ttft_s=0.004, per_token_s=0.001, max_num_running=1)
    workload = Workload.synthetic(24, LengthDist("fixed", 4), LengthDist("fixed", 5), seed=1)
    bench = make_bench(engine, slo=SLO(0.03, 0.5), workload=workload)
    try:
        result = bench.goodput_search(num_devices=1, rate_hint=20.0, rel_tol=0.25)
    finally:
        bench.loop.close()
    curve = dict(result.curve)
    assert result.rate in curve and curve[result.rate] >= 0.9
    assert 10.0 <= result.rate <= 200.0
    assert min(curve.values()) < 0.9  # the search saw the knee from both sides
    assert all(curve[r] < 0.9 for r in curve if r > 2 * result.rate)


def test_goodput_search_aborts_when_nothing_succeeds():
    ids = frozenset(f"bench-{i}" for i in range(6))
    bench = make_bench(FakeEngine(reject_ids=ids))
    try:
        with pytest.raises(BenchmarkAborted, match="no request succeeded at 50 req/s"):
            bench.goodput_search(num_devices=1, rate_hint=50.0)
    finally:
        bench.loop.close()
