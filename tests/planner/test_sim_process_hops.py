"""The time between a disaggregated deployment's processes (`ProcessHops`): the
scheduler-driven simulator delays a request's entry into the prefill queue by the
controller hop and its tokens by the hop back, the fast simulator refuses what it would
ignore, and sim_vs_runtime measures both on the idle 1P1D runtime."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from distserve_rt.planner.latency_model import ConstantLatencyModel
from distserve_rt.planner.simulator import (
    DisaggregatedSimulator,
    DisaggSpec,
    ProcessHops,
    SchedulerDrivenDisaggregated,
    SimInstanceSpec,
)
from distserve_rt.workloads.multi_turn import MultiTurnWorkload

PREFILL_S, DECODE_S = 0.1, 0.01
CONST = SimInstanceSpec(
    ConstantLatencyModel(PREFILL_S, DECODE_S), 10_000, max_batch_tokens=2048, max_num_seqs=64
)
HOPS = ProcessHops(dispatch_s=0.003, token_s=0.002)


def _run(hops: ProcessHops, arrival=(0.0, 1.0)):
    sim = SchedulerDrivenDisaggregated(DisaggSpec(CONST, CONST, hops=hops))
    n = len(arrival)
    return sim.run(np.asarray(arrival), np.full(n, 40), np.full(n, 5))


def test_hops_add_to_ttft_and_leave_tpot():
    base, hops = _run(ProcessHops()), _run(HOPS)
    assert hops.ttft == pytest.approx(base.ttft + HOPS.dispatch_s + HOPS.token_s)
    assert hops.tpot == pytest.approx(base.tpot)
    # The controller hop is queueing before the instance, the token hop is not a stage.
    queue = hops.breakdown()["prefill_queue"] - base.breakdown()["prefill_queue"]
    assert queue == pytest.approx(np.full(2, HOPS.dispatch_s))


def test_each_instances_loop_adds_to_each_of_its_steps():
    """The instances' loops between steps (``prefill_loop_s``, ``decode_loop_s``): a lone
    request's prefill step and every decode step take that much longer."""
    loops = ProcessHops(prefill_loop_s=0.004, decode_loop_s=0.001)
    base, looped = _run(ProcessHops()), _run(loops)
    assert looped.ttft == pytest.approx(base.ttft + 0.004)
    assert looped.tpot == pytest.approx(base.tpot + 0.001)
    assert not loops.is_zero
    with pytest.raises(ValueError, match="decode_loop_s must be a number of seconds >= 0"):
        ProcessHops(decode_loop_s=-0.1)


def test_the_dispatch_hop_delays_a_conversations_next_turn_too():
    conversations = MultiTurnWorkload.generate(
        4, rate=2.0, min_turns=2, max_turns=2, scale=0.05, vocab_size=100, seed=0
    )
    spec = DisaggSpec(CONST, CONST)
    base = SchedulerDrivenDisaggregated(spec).run_conversations(conversations)
    late = SchedulerDrivenDisaggregated(replace(spec, hops=HOPS)).run_conversations(conversations)
    assert late.result.num_requests == base.result.num_requests == 8
    first = late.turn_indices == 0
    assert late.result.ttft[first] == pytest.approx(base.result.ttft[first] + 0.005)


def test_the_fast_simulator_refuses_hops_and_hops_are_checked():
    with pytest.raises(ValueError, match="fast disaggregated simulator does not model"):
        DisaggregatedSimulator(DisaggSpec(CONST, CONST, hops=HOPS))
    with pytest.raises(ValueError, match="dispatch_s must be a number of seconds >= 0, got -1"):
        ProcessHops(dispatch_s=-1)
    assert ProcessHops().is_zero and not HOPS.is_zero


def test_measure_hops_on_the_idle_1p1d_runtime():
    from distserve_rt.benchmarks.sim_vs_runtime import Target, default_simulator
    from distserve_rt.benchmarks.sim_vs_runtime.calibration import Calibration, measure_hops
    from distserve_rt.benchmarks.sim_vs_runtime.drift import ProbeTimes
    from distserve_rt.benchmarks.sim_vs_runtime.targets import DisaggSetup
    from distserve_rt.planner.profiles import ProfileSet
    from distserve_rt.workloads import Workload

    setup = DisaggSetup(64, 4, 64, 4 * 64)
    target = Target("1p1d", setup, default_simulator(setup))
    cal = Calibration(
        1, ProfileSet("cpu", []), ConstantLatencyModel(0.001, 0.001), ProbeTimes(1.0, 1.0), "t"
    )
    workload = Workload("w", np.full(6, 24), np.full(6, 3))
    engine = setup.make_engine(bytes_per_token=4 * 2 * 2 * 64 * 4, launcher="thread")
    try:
        hops = measure_hops(engine, target, cal, workload, num_requests=4)
    finally:
        engine.shutdown()
    # Each a few ms at most on an idle machine, never negative, and written with the setup.
    assert 0 <= hops.dispatch_s < 0.5 and 0 <= hops.token_s < 0.5
    assert replace(setup, hops=hops).describe()["hops"] == vars(hops)
