"""Simulator-vs-runtime plumbing: the replay loop on the real tiny engines (colocated and
disaggregated), the simulated side of the same setups, the drift rescaling and the
aggregation over repeats."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from distserve_rt.benchmarks.sim_vs_runtime import (
    ColocatedSetup,
    DisaggSetup,
    DriftProbe,
    ProbeTimes,
    ScaledLatencyModel,
    replay,
    simulate_colocated,
    simulate_disaggregated,
    summarize_repeats,
)
from distserve_rt.engine.llm_engine import LLMEngine
from distserve_rt.metrics.slo import SLO
from distserve_rt.planner.latency_model import ConstantLatencyModel
from distserve_rt.planner.simulator import ColocatedPolicy, KVTransferSpec
from distserve_rt.workloads import Workload

WORKLOAD = Workload("t", np.array([20, 40, 30, 10]), np.array([3, 1, 5, 2]))


@pytest.mark.parametrize("policy", list(ColocatedPolicy))
def test_replay_serves_every_request_at_its_arrival(policy):
    setup = ColocatedSetup(policy, 64, 4, 64, 4 * 64)
    engine = LLMEngine(setup.engine_config(bytes_per_token=4 * 2 * 2 * 64 * 4))
    arrival = np.array([0.0, 0.0, 0.05, 0.15])
    run = replay(engine, arrival, WORKLOAD)
    assert not engine.has_unfinished_requests()
    assert np.isfinite(run.ttft).all() and (run.ttft >= 0).all()
    # One-token outputs have no TPOT; the others have a positive one (forced lengths).
    assert run.tpot[1] == 0.0 and (run.tpot[[0, 2, 3]] > 0).all()
    # The engine idles until the last arrival instead of taking it early.
    assert run.duration_s >= 0.15
    row = run.row(SLO(10.0, 10.0))
    assert row["attainment"] == 1.0 and row["num_failed"] == 0 and row["num_steps"] >= 5
    assert 0 <= row["mean_between_steps_ms"] < 1e3 * run.duration_s / row["num_steps"]


def test_runtime_row_counts_a_missed_slo():
    setup = ColocatedSetup(ColocatedPolicy.CONTINUOUS_BATCHING, 64, 4, 64, 4 * 64)
    engine = LLMEngine(setup.engine_config(bytes_per_token=4 * 2 * 2 * 64 * 4))
    run = replay(engine, np.zeros(4), WORKLOAD)
    # Nothing finishes its first token in 1 ns.
    assert run.row(SLO(1e-9, 10.0))["attainment"] == 0.0


def test_simulated_side_matches_hand_computation():
    # Constant steps: prefill 0.1 s, decode 0.01 s; requests far apart run alone.
    setup = ColocatedSetup(ColocatedPolicy.CONTINUOUS_BATCHING, 64, 4, 64, 4 * 64)
    arrival = np.array([0.0, 10.0, 20.0, 30.0])
    run = simulate_colocated(setup, ConstantLatencyModel(0.1, 0.01), arrival, WORKLOAD)
    np.testing.assert_allclose(run.ttft, 0.1)
    np.testing.assert_allclose(run.tpot, [0.01, 0.0, 0.01, 0.01])
    assert run.duration_s == pytest.approx(30.0 + 0.1 + 0.01)
    row = run.row(SLO(0.1 + 1e-9, 0.0099))
    assert row["attainment"] == 0.25  # only the one-token request meets the TPOT SLO


def test_timed_executor_counts_async_submit_and_wait():
    # The engine drives executors through execute_async/wait; time spent there is the
    # model's, not host overhead (it was all counted as overhead once).
    import time

    from distserve_rt.benchmarks.sim_vs_runtime.replay import _TimedExecutor

    class Slow:
        def execute_async(self, out, block_offset=0):
            time.sleep(0.01)
            return out

        def wait(self, handle):
            time.sleep(0.01)
            return handle

    timed = _TimedExecutor(Slow())
    assert timed.wait(timed.execute_async("step")) == "step"
    assert timed.execute_s >= 0.02


def test_disaggregated_replay_serves_every_request():
    # 1P1D through the Controller (instances in threads here; processes in the bench).
    setup = DisaggSetup(64, 4, 64, 4 * 64)
    engine = setup.make_engine(bytes_per_token=4 * 2 * 2 * 64 * 4, launcher="thread")
    try:
        run = replay(engine, np.array([0.0, 0.0, 0.05, 0.15]), WORKLOAD)
        assert not engine.has_unfinished_requests()
    finally:
        engine.shutdown()
    assert np.isfinite(run.ttft).all() and (run.ttft >= 0).all()
    assert run.tpot[1] == 0.0 and np.isfinite(run.tpot).all() and (run.tpot[[0, 2, 3]] > 0).all()
    assert run.duration_s >= 0.15
    # No executor to time in this process: no host-overhead figure is made up.
    assert "mean_host_overhead_ms" not in run.extra
    # Where its time went, from the controller's breakdown (KV transfer included).
    assert run.extra["mean_transfer_ms"] >= 0 and run.extra["mean_prefill_ms"] > 0
    assert run.row(SLO(10.0, 10.0))["attainment"] == 1.0


def test_kv_transfer_measured_on_the_idle_runtime():
    from distserve_rt.benchmarks.sim_vs_runtime.calibration import measure_kv_transfer

    setup = DisaggSetup(64, 4, 64, 4 * 64)
    engine = setup.make_engine(bytes_per_token=4 * 2 * 2 * 64 * 4, launcher="thread")
    try:
        spec = measure_kv_transfer(engine, prompt_len=40, num_requests=3)
        assert not engine.has_unfinished_requests()
    finally:
        engine.shutdown()
    # The controller's round trip and the pull: positive, well under a second when idle.
    assert 0 < spec.latency_s < 1.0 and spec.seconds_per_token == 0.0


def test_simulated_disaggregated_side_matches_hand_computation():
    # Prefill 0.1 s, decode 0.01 s, KV pull 0.05 s; requests far apart run alone: the first
    # token at 0.1, then the pull, then output - 1 decode steps.
    setup = DisaggSetup(64, 4, 64, 4 * 64, kv_transfer=KVTransferSpec(latency_s=0.05))
    arrival = np.array([0.0, 10.0, 20.0, 30.0])
    run = simulate_disaggregated(setup, ConstantLatencyModel(0.1, 0.01), arrival, WORKLOAD)
    np.testing.assert_allclose(run.ttft, 0.1)
    out = WORKLOAD.output_lens
    expected = np.where(out > 1, (0.05 + (out - 1) * 0.01) / np.maximum(out - 1, 1), 0.0)
    np.testing.assert_allclose(run.tpot, expected)
    # The stage means over finished requests (the one-token one has no transfer: 0 s).
    assert run.extra["mean_transfer_ms"] == pytest.approx(3 * 50.0 / 4)


def test_scaled_latency_model_scales_each_phase():
    inner = ConstantLatencyModel(0.1, 0.01)
    scaled = ScaledLatencyModel(inner, prefill_scale=2.0, decode_scale=3.0)
    assert scaled.tp == inner.tp
    assert scaled.prefill_s(50, 2500) == pytest.approx(0.2)
    assert scaled.decode_s(4, 100) == pytest.approx(0.03)
    alpha, beta = scaled.decode_affine(4)
    assert (alpha, beta) == pytest.approx((3 * inner.decode_affine(4)[0], 0.0))
    assert scaled.mixed_s(32, 1024, 4, 100) == pytest.approx(2 * inner.mixed_s(32, 1024, 4, 100))
    assert scaled.mixed_s(0, 0, 4, 100) == pytest.approx(0.03)
    # The simulator sees the rescaled steps: an isolated request's TTFT doubles.
    setup = ColocatedSetup(ColocatedPolicy.CONTINUOUS_BATCHING, 64, 4, 64, 4 * 64)
    arrival = np.array([0.0, 10.0, 20.0, 30.0])
    np.testing.assert_allclose(simulate_colocated(setup, scaled, arrival, WORKLOAD).ttft, 0.2)
    with pytest.raises(ValueError, match="decode_scale must be a positive finite number"):
        ScaledLatencyModel(inner, 1.0, 0.0)
    # Mixed steps keep their own scale when one is given (a run's step log measures them).
    own = ScaledLatencyModel(inner, 2.0, 3.0, mixed_scale=5.0)
    assert own.mixed_s(32, 1024, 4, 100) == pytest.approx(5 * inner.mixed_s(32, 1024, 4, 100))


def test_scaled_latency_model_from_a_runs_step_ratios():
    inner = ConstantLatencyModel(0.1, 0.01)
    scaled = ScaledLatencyModel.from_step_ratios(
        inner, {"step_ratio_prefill": 1.5, "step_ratio_decode": 1.2, "num_decode_steps": 9.0}
    )
    assert scaled.prefill_s(50, 2500) == pytest.approx(0.15)
    assert scaled.decode_s(4, 100) == pytest.approx(0.012)
    # No mixed steps in the run: they scale as its prefill steps did.
    assert scaled.mixed_s(32, 1024, 4, 100) == pytest.approx(1.5 * inner.mixed_s(32, 1024, 4, 100))
    only_decode = ScaledLatencyModel.from_step_ratios(inner, {"step_ratio_decode": 2.0})
    assert only_decode.prefill_s(50, 2500) == pytest.approx(0.1)
    assert ScaledLatencyModel.from_step_ratios(inner, {"cpu_share_harness": 0.5}) is None


def test_drift_probe_times_fixed_shapes_and_compares():
    class FakeTimer:
        def __init__(self, slow):
            self.slow, self.calls = slow, []

        def prefill_ms(self, prompt_lens):
            self.calls.append(("prefill", list(prompt_lens)))
            return 10.0 * self.slow

        def decode_ms(self, ctx_lens):
            self.calls.append(("decode", list(ctx_lens)))
            return 2.0 * self.slow

    probe = DriftProbe(prefill_len=96, decode_batch=3, decode_ctx=120)
    timer = FakeTimer(slow=1.5)
    now = probe.measure(timer)
    assert timer.calls == [("prefill", [96]), ("decode", [120, 120, 120])]
    ratio = now.ratio(probe.measure(FakeTimer(slow=1.0)))
    assert ratio == ProbeTimes(pytest.approx(1.5), pytest.approx(1.5))
    # Without a measured reference, the profile's own prediction of the probe stands in.
    assert probe.predict(ConstantLatencyModel(0.1, 0.01)) == ProbeTimes(
        pytest.approx(100.0), pytest.approx(10.0)
    )
    # Each half can run on the cores of its phase's instance; the affinity is restored.
    import os

    before = os.sched_getaffinity(0)
    core = min(before)

    class AffinityTimer(FakeTimer):
        def prefill_ms(self, prompt_lens):
            self.calls.append(os.sched_getaffinity(0))
            return 1.0

        def decode_ms(self, ctx_lens):
            self.calls.append(os.sched_getaffinity(0))
            return 1.0

    timer = AffinityTimer(slow=1.0)
    probe.measure(timer, prefill_cores=(core,))
    assert timer.calls == [{core}, before] and os.sched_getaffinity(0) == before
    with pytest.raises(ValueError, match="decode_batch must be a positive int, got 0"):
        DriftProbe(96, 0, 120)


def test_summarize_repeats_mean_spread_and_gap():
    def rep(runtime, sim, rescaled, drift):
        return {
            "runtime": {"attainment": runtime},
            "simulated": {"attainment": sim},
            "simulated_rescaled": {"attainment": rescaled},
            "drift_ratio": {"prefill_ms": drift, "decode_ms": 2 * drift},
        }

    summary = summarize_repeats([rep(0.8, 0.9, 0.82, 1.0), rep(0.7, 0.9, 0.71, 1.2),
                                 rep(0.9, 0.9, 0.88, 1.4)])  # fmt: skip
    runtime = summary["runtime_attainment"]
    assert runtime["mean"] == pytest.approx(0.8)
    assert (runtime["min"], runtime["max"]) == (0.7, 0.9)
    assert runtime["std"] == pytest.approx(0.1)
    assert summary["runtime_mean_se_pp"] == pytest.approx(10 / np.sqrt(3))
    assert summary["gap_pp"] == pytest.approx(-10.0)
    assert summary["gap_rescaled_pp"] == pytest.approx(100 * (0.8 - (0.82 + 0.71 + 0.88) / 3))
    assert summary["drift_decode"]["mean"] == pytest.approx(2.4)
    assert summary["num_repeats"] == 3
    assert summarize_repeats([rep(0.5, 0.5, 0.5, 1.0)])["runtime_attainment"]["std"] == 0.0
    assert "gap_in_run_pp" not in summary
    # Repeats with a step log carry the in-run side: its gap is reported beside the others.
    logged = [
        {**rep(0.8, 0.9, 0.82, 1.0), "simulated_in_run": {"attainment": 0.79}},
        {**rep(0.6, 0.9, 0.82, 1.0), "simulated_in_run": {"attainment": 0.63}},
    ]
    assert summarize_repeats(logged)["gap_in_run_pp"] == pytest.approx(-1.0)
    assert "gap_in_run_pp" not in summarize_repeats([logged[0], rep(0.5, 0.5, 0.5, 1.0)])


def test_calibration_probe_reference_sources(tmp_path):
    from distserve_rt.benchmarks.sim_vs_runtime.calibration import (
        calibrate,
        kv_transfer_from_bench,
        profile_threads,
    )
    from distserve_rt.planner.profiles import ProfileSet

    probe, latency = DriftProbe(96, 3, 120), ConstantLatencyModel(0.1, 0.01)

    class Timer:
        def prefill_ms(self, prompt_lens):
            return 7.0

        def decode_ms(self, ctx_lens):
            return 3.0

    # Profiled here: the probe is timed now and kept in the profile's measurement.
    profile = ProfileSet("cpu", [], measurement={"threads": 1})
    cal = calibrate(profile, latency, 1, probe, Timer())
    assert cal.probe_reference == ProbeTimes(7.0, 3.0)
    assert profile.measurement["drift_probe"]["prefill_ms"] == 7.0
    # A file with that probe: its reference; without one: the profile's prediction.
    assert calibrate(profile, latency, 1, probe, None).reference_source == "profile file"
    other = calibrate(ProfileSet("cpu", []), latency, 1, probe, None)
    assert other.reference_source == "predicted by the profile"
    assert other.probe_reference == ProbeTimes(pytest.approx(100.0), pytest.approx(10.0))
    with pytest.raises(ValueError, match=r"p.json: measurement.threads must be .* got None"):
        profile_threads(ProfileSet("cpu", []), "p.json")
    # A result of the harness gives its profiles back, probe reference included.
    import json

    from distserve_rt.benchmarks.sim_vs_runtime.calibration import load_profiles
    from distserve_rt.planner.latency_model import FittedCoefficients
    from distserve_rt.planner.profiles import ProfileEntry

    co = FittedCoefficients((1.0, 0.1, 0.0), (2.0, 0.0, 0.1), (2.0, 0.0, 0.1))
    fitted = ProfileSet("cpu", [ProfileEntry("llama-tiny", 1, co)], measurement={"threads": 1})
    cal = calibrate(fitted, latency, 1, probe, Timer())
    result = tmp_path / "svr.json"
    payload = {"benchmark": "sim_vs_runtime", "profiles": {"1": cal.describe()}}
    result.write_text(json.dumps(payload))
    (again,) = load_profiles(result)
    assert again.entries[0].coefficients == co and again.measurement["threads"] == 1
    assert calibrate(again, latency, 1, probe, None).probe_reference == ProbeTimes(7.0, 3.0)
    # The shm bench's one-thread tiny-model pull and its submit-to-success latency.
    bench = tmp_path / "transfer.json"
    bench.write_text(
        '{"bandwidth": [{"case": "llama-tiny, 128 blocks", "threads": 1, "pull_gbps": 4.0}],'
        ' "latency": {"submit_to_success_median_us": 20.0}}'
    )
    spec = kv_transfer_from_bench(bench, bytes_per_token=4000)
    assert spec.seconds_per_token == pytest.approx(1e-6) and spec.latency_s == pytest.approx(2e-5)


def _script():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).parents[2] / "bench" / "sim_vs_runtime.py"
    spec = importlib.util.spec_from_file_location("sim_vs_runtime_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_script_defaults_quick_and_shared_slo():
    script = _script()
    args = script.parse_args([])
    assert (args.num_requests, args.repeats) == (1000, 3)
    assert (args.simulator, args.calibration, args.no_wake) == ("driven", "engine", False)
    assert (
        args.instance_profile and not script.parse_args(["--no-instance-profile"]).instance_profile
    )
    assert len(args.load_factors) == 3  # the full run stays near half an hour
    assert args.targets == ["continuous_batching", "chunked_prefill", "disaggregated_1p1d"]
    # --quick shrinks only what the user left at its default.
    quick = script.parse_args(["--quick", "--repeats", "2"])
    assert (quick.num_requests, quick.repeats, quick.load_factors) == (60, 2, [0.5, 1.5])
    with pytest.raises(SystemExit):
        script.parse_args(["--repeats", "0"])
    # One SLO for all targets: the loosest of each profile's.
    assert script.loosest([SLO(0.1, 0.02), SLO(0.2, 0.01)]) == SLO(0.2, 0.02)


def test_one_run_probes_simulates_twice_and_serves():
    from distserve_rt.benchmarks.sim_vs_runtime import Target, default_simulator
    from distserve_rt.benchmarks.sim_vs_runtime.calibration import Calibration
    from distserve_rt.benchmarks.sim_vs_runtime.runs import RunSpec, one_run
    from distserve_rt.planner.profiles import ProfileSet

    class Timer:  # the machine is twice as slow as when the profile was measured
        def prefill_ms(self, prompt_lens):
            return 20.0

        def decode_ms(self, ctx_lens):
            return 4.0

    setup = ColocatedSetup(ColocatedPolicy.CONTINUOUS_BATCHING, 64, 4, 64, 4 * 64)
    cal = Calibration(
        1, ProfileSet("cpu", []), ConstantLatencyModel(0.1, 0.01), ProbeTimes(10.0, 2.0), "test"
    )
    target = Target("cb", setup, default_simulator(setup))
    slo = SLO(0.15, 10.0)  # met by 0.1 s prefills, missed by rescaled 0.2 s ones
    run = RunSpec(target, cal, 1.0, np.array([0.0, 10.0, 20.0, 30.0]) / 100, WORKLOAD, slo, 1)
    engine = setup.make_engine(bytes_per_token=4 * 2 * 2 * 64 * 4)
    record = one_run(run, engine, DriftProbe(16, 2, 16), Timer())
    assert record["drift_ratio"] == {"prefill_ms": 2.0, "decode_ms": 2.0}
    assert record["simulated"]["attainment"] == 1.0
    assert record["simulated_rescaled"]["attainment"] == 0.0
    assert record["runtime"]["num_failed"] == 0 and record["load_average_1min_after"] >= 0
    # The colocated engine logged its steps: simulated again at their measured speed.
    ratio = record["runtime"]["step_ratio_prefill"]
    in_run = record["simulated_in_run"]
    assert in_run["mean_ttft_s"] == pytest.approx(0.1 * ratio, rel=1e-6)
    # With a calibration at the rate, the run's speed rescales that model and its loop
    # instead (a prefill 5x the profile's, so a fifth of the ratio; a 5 ms loop).
    at_load = Calibration(
        1, ProfileSet("cpu", []), ConstantLatencyModel(0.5, 0.01), ProbeTimes(10.0, 2.0), "t",
        engine_loop_s=0.005,
    )  # fmt: skip
    record = one_run(replace(run, at_load=at_load), engine, DriftProbe(16, 2, 16), Timer())
    ratio = record["runtime"]["step_ratio_prefill"]  # still against the profile
    in_run = record["simulated_in_run"]
    assert in_run["mean_ttft_s"] == pytest.approx(0.1 * ratio + 0.005, rel=1e-6)
    engine.shutdown()


def test_one_run_on_1p1d_reads_the_instances_steps():
    """The controller gathers its instances' step logs: a 1P1D row carries the prefill
    instance's and the decode instance's measured/predicted ratios and the in-run column."""
    from distserve_rt.benchmarks.sim_vs_runtime import Target, default_simulator
    from distserve_rt.benchmarks.sim_vs_runtime.calibration import Calibration
    from distserve_rt.benchmarks.sim_vs_runtime.runs import RunSpec, one_run
    from distserve_rt.planner.profiles import ProfileSet

    class Timer:
        def prefill_ms(self, prompt_lens):
            return 1.0

        def decode_ms(self, ctx_lens):
            return 1.0

    setup = DisaggSetup(64, 4, 64, 4 * 64)
    cal = Calibration(
        1, ProfileSet("cpu", []), ConstantLatencyModel(0.001, 0.001), ProbeTimes(1.0, 1.0), "t"
    )
    target = Target("1p1d", setup, default_simulator(setup))
    run = RunSpec(target, cal, 1.0, np.array([0.0, 0.0, 0.05, 0.15]), WORKLOAD, SLO(1, 1), 1)
    engine = setup.make_engine(bytes_per_token=4 * 2 * 2 * 64 * 4, launcher="thread")
    try:
        record = one_run(run, engine, DriftProbe(16, 2, 16), Timer())
    finally:
        engine.shutdown()
    row = record["runtime"]
    assert row["num_prefill_steps"] >= 1 and row["num_decode_steps"] >= 1
    assert row["step_ratio_prefill"] > 0 and row["step_ratio_decode"] > 0
    assert "simulated_in_run" in record


class _Doubling:
    """Noise that doubles every step (mean 2: easy to compute by hand)."""

    def sample(self, rng):
        return 2.0


class _Coin:
    """Noise of 0.5 or 1.5 at random: different seeds, different runs."""

    def sample(self, rng):
        return 0.5 if rng.random() < 0.5 else 1.5


@pytest.mark.parametrize("placement", ["colocated", "disaggregated"])
def test_driven_simulators_are_the_default_and_apply_noise(placement):
    from distserve_rt.benchmarks.sim_vs_runtime import (
        default_simulator,
        simulate_colocated_driven,
        simulate_disaggregated_driven,
    )

    if placement == "colocated":
        setup = ColocatedSetup(ColocatedPolicy.CONTINUOUS_BATCHING, 64, 4, 64, 4 * 64)
        expected = simulate_colocated_driven
    else:
        setup = DisaggSetup(64, 4, 64, 4 * 64, kv_transfer=KVTransferSpec(latency_s=0.05))
        expected = simulate_disaggregated_driven
    simulate = default_simulator(setup)
    assert simulate is expected
    latency, arrival = ConstantLatencyModel(0.1, 0.01), np.array([0.0, 10.0, 20.0, 30.0])
    # Requests far apart run alone: the prefill alone is the TTFT, times the noise.
    np.testing.assert_allclose(simulate(setup, latency, arrival, WORKLOAD).ttft, 0.1)
    doubled = simulate(setup, latency, arrival, WORKLOAD, _Doubling(), 0)
    np.testing.assert_allclose(doubled.ttft, 0.2)
    # A seed fixes the draws; repeats with their own seeds draw differently.
    one, again = (simulate(setup, latency, arrival, WORKLOAD, _Coin(), 1) for _ in range(2))
    np.testing.assert_array_equal(one.ttft, again.ttft)
    draws = {tuple(simulate(setup, latency, arrival, WORKLOAD, _Coin(), s).ttft) for s in range(8)}
    assert len(draws) > 1


def test_fast_simulators_refuse_noise():
    from distserve_rt.benchmarks.sim_vs_runtime import default_simulator

    setup = ColocatedSetup(ColocatedPolicy.CONTINUOUS_BATCHING, 64, 4, 64, 4 * 64)
    fast = default_simulator(setup, "fast")
    assert fast is simulate_colocated
    with pytest.raises(ValueError, match="noise must be None for the fast simulators"):
        fast(setup, ConstantLatencyModel(0.1, 0.01), np.zeros(4), WORKLOAD, _Doubling(), 0)
    with pytest.raises(ValueError, match=r"simulator must be one of \['driven', 'fast'\], got 'x'"):
        default_simulator(setup, "x")


def test_step_time_ratios_compare_the_engine_steps_with_the_model():
    from distserve_rt.benchmarks.sim_vs_runtime.steps import step_time_ratios
    from distserve_rt.engine.step_log import StepRecord, StepShape

    prefill = StepShape(1, 32, 32 * 32, 0, 0)
    decode = StepShape(0, 0, 0, 2, 40)
    mixed = StepShape(1, 16, 16 * 16, 2, 40)
    records = [
        StepRecord(prefill, 0.3, 0.2),  # 3x the model's 0.1 s
        StepRecord(prefill, 0.1, 0.1),  # 1x: time-weighted, (0.3 + 0.1) / 0.2 = 2
        StepRecord(decode, 0.01, 0.01),
        StepRecord(mixed, 0.15, 0.1),
    ]
    latency = ConstantLatencyModel(0.1, 0.01)
    out = step_time_ratios(records, latency)
    assert out["step_ratio_prefill"] == pytest.approx(2.0)
    assert out["step_ratio_decode"] == pytest.approx(1.0)
    assert out["step_ratio_mixed"] == pytest.approx(0.15 / latency.mixed_s(16, 256, 2, 40))
    assert out["num_prefill_steps"] == 2 and out["mean_prefill_step_ms"] == pytest.approx(200)


def test_profile_cores_pin_one_thread_like_a_disaggregated_instance():
    import os

    from distserve_rt.benchmarks.sim_vs_runtime.calibration import profile_cores

    cores = sorted(os.sched_getaffinity(0))
    assert profile_cores(len(cores)) is None  # a colocated engine takes them all, unpinned
    if len(cores) > 1:
        assert profile_cores(1) == (cores[0],)  # the prefill instance's core


def test_instance_profile_fits_a_running_1p1d_from_its_instances_steps():
    """1P1D is calibrated on its own instances: the fit's steps are the prefill instance's
    prefills and the decode instance's decodes, recorded in their processes (threads here)."""
    from distserve_rt.benchmarks.engine_profile import EngineWorkload
    from distserve_rt.benchmarks.sim_vs_runtime.calibration import (
        profile_instances,
        wake_from_profile,
    )

    setup = DisaggSetup(64, 8, 96, 8 * 96)
    engine = setup.make_engine(bytes_per_token=4 * 2 * 2 * 64 * 4, launcher="thread")
    workload = EngineWorkload(num_steps=60, max_prompt_len=64, max_output_len=16, max_queued=16)
    try:
        profile = profile_instances(engine, workload, repeats=1, hardware="cpu")
    finally:
        engine.shutdown()
    m = profile.measurement
    assert m["mode"] == "instances" and m["threads"] == 1
    assert m["num_steps"]["prefill"] > 0 and m["num_steps"]["decode"] > 0
    assert m["num_steps"]["mixed"] == 0  # no instance runs both
    # Each busy instance's loop between its steps, from the steps' start times.
    assert m["loop_gap_ms"]["prefill"] > 0 and m["loop_gap_ms"]["decode"] > 0
    assert profile.entries[0].coefficients.overhead > 0
    # The prefill instance's own wake-up cost, timed from its step log through the
    # controller (a step after each idle wait, back to back first).
    wake = wake_from_profile(profile)
    assert wake is not None and wake.idle_s[0] == 0 and len(wake.idle_s) > 1


def test_engine_profile_fits_the_running_engine_with_noise():
    from distserve_rt.benchmarks.engine_profile import EngineWorkload
    from distserve_rt.benchmarks.sim_vs_runtime.calibration import profile_engine

    setup = ColocatedSetup(ColocatedPolicy.CHUNKED_PREFILL, 64, 8, 96, 8 * 96)
    engine = setup.make_engine(bytes_per_token=4 * 2 * 2 * 64 * 4)
    workload = EngineWorkload(num_steps=80, max_prompt_len=64, max_output_len=16, max_queued=16)
    try:
        profile = profile_engine(engine, workload, 1, repeats=1, hardware="cpu")
    finally:
        engine.shutdown()
    m = profile.measurement
    assert m["mode"] == "engine" and m["threads"] == 1 and m["policy"] == "chunked_prefill"
    assert m["num_steps"]["prefill"] > 0 and m["num_steps"]["decode"] > 0
    entry = profile.entries[0]
    assert entry.coefficients.overhead > 0  # the host's part of every step
    assert 0 < m["loop_gap_ms"]["engine"] < 2  # its loop between busy steps
    assert profile.step_noise(engine.model_config, 1) is not None


def test_replay_times_the_loop_between_busy_steps_not_idle_waits():
    # A fake engine: each request takes two steps of 10 ms on a driven clock; the loop
    # costs 1 ms per step (the clock moves when it polls), idle waits are not counted.
    from types import SimpleNamespace

    class Engine:
        model_config = SimpleNamespace(vocab_size=100)

        def __init__(self):
            self.now, self.left, self.done = 0.0, {}, []

        def add_request(self, rid, prompt, params, arrival_time):
            self.left[rid] = 2

        def has_unfinished_requests(self):
            self.now += 0.0005  # the loop's own polls
            return bool(self.left)

        def step(self, timeout):
            self.now += 0.010
            out = []
            for rid in list(self.left):
                self.left[rid] -= 1
                if not self.left[rid]:
                    del self.left[rid]
                    m = SimpleNamespace(ttft=0.01, tpot=0.0, finished_time=self.now, breakdown=None)
                    done = [SimpleNamespace(finish_reason="length")]
                    out.append(
                        SimpleNamespace(request_id=rid, outputs=done, metrics=m, finished=True)
                    )
            return out

    engine = Engine()

    def sleep(s):  # overshoots by a tick, as a real sleep may (the replay only polls then)
        engine.now += s + 0.002

    run = replay(engine, np.array([0.0, 1.0]), Workload("t", np.array([4, 4]), np.array([1, 1])),
                 clock=lambda: engine.now, sleep=sleep)  # fmt: skip
    # Between the two busy steps of r0: one poll (the loop's condition stops at i < n);
    # of r1: two (the condition's and the step's); the 1 s idle wait is not counted.
    assert run.extra["num_steps"] == 4
    assert run.extra["mean_between_steps_ms"] == pytest.approx((0.5 + 1.0) / 4)


def test_cpu_meter_reads_processes_cpu_time():
    import os
    import time

    from distserve_rt.benchmarks.sim_vs_runtime.cpu_time import (
        CpuMeter,
        engine_pids,
        process_cpu_s,
    )

    assert process_cpu_s(os.getpid()) == pytest.approx(time.process_time(), abs=0.05)
    assert process_cpu_s(2**22 + 12345) == 0.0  # no such process: nothing, not a failure
    # Busy for 50 ms of CPU time, however long the machine takes to give it (a wall-time
    # loop got 46% of a core with the suite running beside it): the share is the CPU time
    # this process had over the wall time, as measured here around the meter.
    wall0, cpu0 = time.monotonic(), time.process_time()
    meter = CpuMeter({"harness": None})
    while time.process_time() - cpu0 < 0.05:
        pass
    share = meter.shares()["cpu_share_harness"]
    expected = (time.process_time() - cpu0) / (time.monotonic() - wall0)
    assert share == pytest.approx(expected, abs=0.1) and share > 0.05
    assert engine_pids(object()) == {"harness": None}


def test_engine_profile_workload_can_take_the_served_lengths():
    from distserve_rt.benchmarks.engine_profile import EngineWorkload

    kw = {"num_steps": 200, "max_prompt_len": 192, "max_output_len": 48}
    served = EngineWorkload(**kw, lengths="uniform", min_prompt_len=16, min_output_len=8)
    prompts = [len(p) for step in served.arrivals(512) for p, _ in step]
    outputs = [n for step in served.arrivals(512) for _, n in step if n > 1]
    assert min(prompts) >= 16 and max(prompts) <= 192 and min(outputs) >= 8
    # Uniform: the mean sits mid-range; log-uniform (the default) puts it far lower, so
    # a profile of it extrapolates the long contexts the served steps have.
    assert 80 < np.mean(prompts) < 130
    default = [len(p) for step in EngineWorkload(**kw).arrivals(512) for p, _ in step]
    assert np.mean(default) < 60
    with pytest.raises(ValueError, match="lengths must be one of .*got 'zipf'"):
        EngineWorkload(**kw, lengths="zipf")
    with pytest.raises(ValueError, match=r"min_prompt_len must be in \[1, max_prompt_len=192\]"):
        EngineWorkload(**kw, min_prompt_len=500)


def test_wake_penalty_interpolates_and_is_measured_against_busy_steps():
    from distserve_rt.benchmarks.sim_vs_runtime.wake import WakePenalty, measure_wake

    wake = WakePenalty.from_medians([0.0, 0.02, 0.1], [0.010, 0.012, 0.018])
    assert wake(0.0) == 0.0 and wake(0.01) == pytest.approx(0.001)
    assert wake(0.06) == pytest.approx(0.005) and wake(5.0) == pytest.approx(0.008)
    # Faster than back to back (noise) is no penalty, never a negative one.
    assert WakePenalty.from_medians([0.0, 0.1], [0.010, 0.009]).extra_s == (0.0, 0.0)
    with pytest.raises(ValueError, match="WakePenalty needs >= 2 increasing idle_s"):
        WakePenalty((0.1, 0.0), (0.0, 0.0))
    # On the tiny engine with a sleep that sleeps not: one request per timed step, every
    # idle point measured, and the penalty of no idleness stays ~0.
    setup = ColocatedSetup(ColocatedPolicy.CHUNKED_PREFILL, 64, 4, 64, 4 * 64)
    engine = setup.make_engine(bytes_per_token=4 * 2 * 2 * 64 * 4)
    slept = []
    try:
        measured = measure_wake(engine, 16, repeats=2, idle_points=(0.0, 0.05), sleep=slept.append)
    finally:
        engine.shutdown()
    assert slept == [0.05, 0.05] and measured.idle_s == (0.0, 0.05)
    assert engine.step_log is None and not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="idle_points must start at 0"):
        measure_wake(object(), 16, idle_points=(0.01,))


@pytest.mark.parametrize("placement", ["colocated", "disaggregated"])
def test_driven_simulators_charge_the_wake_up_after_idling(placement):
    from distserve_rt.benchmarks.sim_vs_runtime import default_simulator
    from distserve_rt.benchmarks.sim_vs_runtime.wake import WakePenalty

    if placement == "colocated":
        setup = ColocatedSetup(ColocatedPolicy.CONTINUOUS_BATCHING, 64, 4, 64, 4 * 64)
    else:
        setup = DisaggSetup(64, 4, 64, 4 * 64, kv_transfer=KVTransferSpec(latency_s=0.05))
    simulate, latency = default_simulator(setup), ConstantLatencyModel(0.1, 0.01)
    wake = WakePenalty((0.0, 1.0), (0.0, 0.03))  # 30 ms after >= 1 s idle
    workload = Workload("t", np.array([20, 20]), np.array([1, 1]))
    # Far apart: each prefill starts on an idle instance and pays the wake-up.
    apart = simulate(setup, latency, np.array([0.0, 10.0]), workload, wake=wake)
    np.testing.assert_allclose(apart.ttft, 0.13)
    # The second arrives during the first's step, which it then follows: 0.13 + 0.1 - 0.05.
    queued = simulate(setup, latency, np.array([0.0, 0.05]), workload, wake=wake)
    np.testing.assert_allclose(queued.ttft, [0.13, 0.18])
    fast = default_simulator(setup, "fast")
    with pytest.raises(ValueError, match="wake must be None for the fast simulators"):
        fast(setup, latency, np.zeros(2), workload, wake=wake)


def test_calibrate_at_load_refits_on_the_steps_served_at_the_rate():
    """The calibration at a rate is fitted on the engine's own steps serving held-out
    requests at that rate: a profile that says steps take a second is replaced by the
    engine's real (millisecond) steps, with no wake-up cost on top (it is in the fit)."""
    from distserve_rt.benchmarks.sim_vs_runtime.calibration import (
        Calibration,
        calibrate_at_load,
    )
    from distserve_rt.benchmarks.sim_vs_runtime.wake import WakePenalty
    from distserve_rt.planner.profiles import ProfileSet

    setup = ColocatedSetup(ColocatedPolicy.CONTINUOUS_BATCHING, 96, 8, 96, 8 * 96)
    engine = setup.make_engine(bytes_per_token=4 * 2 * 2 * 64 * 4)
    wrong = Calibration(
        1, ProfileSet("cpu", []), ConstantLatencyModel(1.0, 1.0), ProbeTimes(1.0, 1.0), "t",
        wake=WakePenalty((0.0, 1.0), (0.0, 1.0)), engine_loop_s=1.0,
    )  # fmt: skip
    rng = np.random.default_rng(3)
    held_out = Workload("h", rng.integers(8, 64, 40), rng.integers(2, 12, 40))
    arrival = np.cumsum(rng.exponential(0.01, 40))
    try:
        cal = calibrate_at_load(
            engine, wrong, arrival, held_out, rate=100.0, seed=1, hardware="cpu"
        )
    finally:
        engine.shutdown()
    m = cal.profile.measurement
    assert m["mode"] == "at_load" and m["num_requests"] == 40 and m["rate"] > 0
    assert m["num_steps"]["prefill"] > 0 and m["num_steps"]["decode"] > 0
    assert cal.wake is None and cal.noise is None  # the noise stays off when cal had none
    assert cal.probe_reference == wrong.probe_reference
    assert 0 < cal.latency.decode_s(4, 4 * 40) < 0.1  # the engine's steps, not 1 s
    assert 0 < cal.latency.prefill_s(32, 32 * 32) < 0.1
    # The engine's loop between steps at this rate replaces the profile's (not 1 s).
    assert 0 < cal.engine_loop_s < 0.002
    assert m["loop_gap_ms"]["engine"] == pytest.approx(1e3 * cal.engine_loop_s)


def test_summarize_repeats_gap_at_load_only_when_every_repeat_has_it():
    row = {"attainment": 0.5}
    base = {"runtime": {"attainment": 0.9}, "simulated": row, "simulated_rescaled": row,
            "drift_ratio": {"prefill_ms": 1.0, "decode_ms": 1.0}}  # fmt: skip
    both = [{**base, "simulated_at_load": {"attainment": 0.8}}] * 2
    assert summarize_repeats(both)["gap_at_load_pp"] == pytest.approx(10.0)
    assert "gap_at_load_pp" not in summarize_repeats([both[0], base])


def test_loop_gaps_are_the_short_pauses_between_one_kinds_steps():
    from distserve_rt.benchmarks.sim_vs_runtime.steps import loop_gaps_s
    from distserve_rt.engine.step_log import StepRecord, StepShape

    decode, prefill = StepShape(0, 0, 0, 2, 40), StepShape(1, 32, 32 * 32, 0, 0)
    records = [
        StepRecord(decode, 0.010, 0.009, 1.000),  # pause 0.001 before the next
        StepRecord(prefill, 0.020, 0.019, 1.005),  # another instance's step: its own kind
        StepRecord(decode, 0.010, 0.009, 1.011),  # pause 0.003
        StepRecord(decode, 0.010, 0.009, 1.024),  # 0.5 s idle after: not the loop's
        StepRecord(decode, 0.010, 0.009, 1.534),
        StepRecord(decode, 0.010, 0.009, None),  # no start time: skipped
    ]
    gaps = loop_gaps_s(records)
    assert gaps["decode"] == pytest.approx(0.001)  # 0.003 is above BUSY_GAP_S too
    assert "prefill" not in gaps  # one step: no pause to measure
    assert StepRecord.from_dict(records[0].to_dict()) == records[0]
    old = {k: v for k, v in records[0].to_dict().items() if k != "start_s"}
    assert StepRecord.from_dict(old).start_s is None  # logs written before start_s load


def test_engine_loop_is_the_short_pauses_between_any_two_steps():
    from distserve_rt.benchmarks.sim_vs_runtime.steps import engine_loop_s
    from distserve_rt.engine.step_log import StepRecord, StepShape

    decode, prefill = StepShape(0, 0, 0, 2, 40), StepShape(1, 32, 32 * 32, 0, 0)
    records = [
        StepRecord(prefill, 0.020, 0.019, 1.000),  # pause 0.0002 before the next
        StepRecord(decode, 0.010, 0.009, 1.0202),  # pause 0.0004: a colocated engine's
        StepRecord(decode, 0.010, 0.009, 1.0306),  # 0.5 s idle after: not the loop's
        StepRecord(decode, 0.010, 0.009, 1.5406),
        StepRecord(decode, 0.010, 0.009, None),  # no start time: skipped
    ]
    assert engine_loop_s(records) == pytest.approx(0.0003)
    assert engine_loop_s(records[2:4]) is None  # only an idle wait


def test_the_driven_colocated_simulator_adds_the_engines_loop_to_every_step():
    from dataclasses import replace

    from distserve_rt.benchmarks.sim_vs_runtime import default_simulator

    setup = ColocatedSetup(ColocatedPolicy.CONTINUOUS_BATCHING, 64, 4, 64, 4 * 64)
    latency, arrival = ConstantLatencyModel(0.1, 0.01), np.array([0.0, 10.0, 20.0, 30.0])
    simulate = default_simulator(setup)
    base = simulate(setup, latency, arrival, WORKLOAD)
    looped = simulate(replace(setup, loop_s=0.002), latency, arrival, WORKLOAD)
    np.testing.assert_allclose(looped.ttft, base.ttft + 0.002)
    one_token = WORKLOAD.output_lens == 1  # no second token: no TPOT
    np.testing.assert_allclose(looped.tpot, base.tpot + np.where(one_token, 0, 0.002))
    with pytest.raises(ValueError, match="loop_s must be 0 for the fast simulator"):
        default_simulator(setup, "fast")(replace(setup, loop_s=0.002), latency, arrival, WORKLOAD)
    with pytest.raises(ValueError, match="loop_s must be a finite time >= 0 s, got -1"):
        simulate(replace(setup, loop_s=-1), latency, arrival, WORKLOAD)


def test_results_leave_the_at_load_noise_sequences_out():
    from distserve_rt.benchmarks.sim_vs_runtime.calibration import Calibration
    from distserve_rt.planner.latency_model import FittedCoefficients
    from distserve_rt.planner.profiles import ProfileEntry, ProfileSet
    from distserve_rt.planner.step_noise import StepTimeNoise

    co = FittedCoefficients((1.0, 0.01, 0.0), (1.0, 0.001, 0.01), (1.0, 0.001, 0.01))
    noise = {"all": StepTimeNoise.from_ratios(np.linspace(0.8, 1.2, 100))}
    profile = ProfileSet("cpu", [ProfileEntry("llama-tiny", 1, co, step_noise=noise)])
    cal = Calibration(1, profile, ConstantLatencyModel(1.0, 1.0), ProbeTimes(1.0, 1.0), "t")
    full, short = cal.describe(), cal.describe(sequences=False)
    assert len(full["profile"]["entries"][0]["step_noise_sequence"]["all"]) == 100
    assert "step_noise_sequence" not in short["profile"]["entries"][0]
    assert (
        short["profile"]["entries"][0]["step_noise"] == full["profile"]["entries"][0]["step_noise"]
    )
    assert "step_noise_sequence" in cal.profile.to_dict()["entries"][0]  # the profile keeps it
