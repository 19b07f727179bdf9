"""One repeat of one (target, rate): time the drift probe, simulate with the profile as
measured and rescaled by the probe's ratio, serve the same requests on the engine."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np
from tqdm import tqdm

from distserve_rt.benchmarks.sim_vs_runtime.calibration import Calibration, set_threads
from distserve_rt.benchmarks.sim_vs_runtime.cpu_time import CpuMeter, engine_pids
from distserve_rt.benchmarks.sim_vs_runtime.drift import DriftProbe, ScaledLatencyModel
from distserve_rt.benchmarks.sim_vs_runtime.replay import replay
from distserve_rt.benchmarks.sim_vs_runtime.steps import step_time_ratios
from distserve_rt.benchmarks.sim_vs_runtime.targets import ColocatedSetup, Target
from distserve_rt.engine.protocol import EngineCore
from distserve_rt.metrics.slo import SLO
from distserve_rt.planner.step_timer import StepTimer
from distserve_rt.sampling_params import SamplingParams
from distserve_rt.workloads.workload import Workload


@dataclass(frozen=True)
class RunSpec:
    """One (target, rate): what each of its repeats serves and simulates."""

    target: Target
    cal: Calibration
    rate: float
    arrival: np.ndarray
    """``[num_requests]`` s after the start, non-decreasing."""
    workload: Workload
    slo: SLO
    engine_threads: int
    """Threads of this process while serving (a colocated engine computes in it)."""
    seed: int = 0
    """Prompt tokens."""
    noise_seed: int = 0
    """The simulated step-time noise's draws (a repeat's own: repeats differ as runs do)."""
    at_load: Calibration | None = None
    """Refitted on the engine's steps at this rate on held-out requests
    (`calibration.calibrate_at_load`): each repeat is also simulated with it."""


def one_run(
    run: RunSpec, engine: EngineCore, probe: DriftProbe, probe_timer: StepTimer
) -> dict[str, object]:
    """One repeat's record: the drift ratio, the load average around it, and the rows of
    the runtime, the simulator and the drift-rescaled simulator."""
    target, cal = run.target, run.cal
    set_threads(cal.threads)  # the probe runs as the profile was measured
    load_before = os.getloadavg()[0]
    ratio = probe.measure(probe_timer, *instance_cores(engine)).ratio(cal.probe_reference)
    set_threads(run.engine_threads)
    kw = {"noise": cal.noise, "seed": run.noise_seed, "wake": cal.wake}
    setup = with_loop(target.setup, cal)
    simulated = target.simulate(setup, cal.latency, run.arrival, run.workload, **kw)
    rescaled_latency = ScaledLatencyModel.from_ratio(cal.latency, ratio)
    rescaled = target.simulate(setup, rescaled_latency, run.arrival, run.workload, **kw)
    desc = f"{target.name} @ {run.rate:g} req/s"
    # The engine logs its steps (1P1D: each instance its own, gathered by the controller):
    # their times against the model's, in the row.
    log = engine.enable_step_log(1 << 24)
    meter = CpuMeter(engine_pids(engine))
    try:
        with tqdm(total=len(run.arrival), desc=desc, unit="req", leave=False) as bar:
            runtime = replay(engine, run.arrival, run.workload, seed=run.seed, progress=bar.update)
    finally:
        records = log.records()
        engine.disable_step_log()
    runtime.extra.update(meter.shares())
    ratios = step_time_ratios(records, cal.latency)
    runtime.extra.update(ratios)
    # At the run's own speed, from the calibration at the rate where there is one: its fit
    # has this rate's batch shapes, so a per-kind ratio rescales it most evenly.
    base = run.at_load or cal
    in_run_ratios = ratios if base is cal else step_time_ratios(records, base.latency)
    in_run = in_run_simulation(run, base, in_run_ratios)
    return {
        "drift_ratio": ratio.to_dict(),
        "noise_seed": run.noise_seed,
        "load_average_1min_before": load_before,
        "load_average_1min_after": os.getloadavg()[0],
        "runtime": runtime.row(run.slo),
        "simulated": simulated.row(run.slo),
        "simulated_rescaled": rescaled.row(run.slo),
        **({} if in_run is None else {"simulated_in_run": in_run.row(run.slo)}),
        **({} if run.at_load is None else {"simulated_at_load": _at_load(run).row(run.slo)}),
    }


def _at_load(run: RunSpec):
    """The same requests simulated with the calibration fitted at this rate (a prediction:
    its steps came from other requests than these)."""
    cal = run.at_load
    kw = {"noise": cal.noise, "seed": run.noise_seed, "wake": cal.wake}
    setup = with_loop(run.target.setup, cal)
    return run.target.simulate(setup, cal.latency, run.arrival, run.workload, **kw)


def with_loop(setup, cal: Calibration):
    """A colocated ``setup`` with ``cal``'s engine loop between steps (1P1D: unchanged, its
    loops are in its hops)."""
    if isinstance(setup, ColocatedSetup):
        return replace(setup, loop_s=cal.engine_loop_s)
    return setup


def in_run_simulation(run: RunSpec, cal: Calibration, ratios: dict[str, float]):
    """The same requests simulated at the speed the served run's steps had (``cal``'s
    model's step times times the run's measured/predicted ``ratios`` per step kind (against
    that model, `step_time_ratios`): 1P1D's prefill
    steps are the prefill instance's, its decode steps the decode instance's); None
    without a step log. Not a prediction (it uses the run's own measurement): it splits a
    gap in two. What is left against the runtime is the simulator's (scheduling,
    queueing, time outside the steps, the shape of the noise); what it closes is the step
    times' level, from the model's fit or the machine's speed during the run. The wake-up
    cost is already in the measured prefill steps, so it is not charged again."""
    latency = ScaledLatencyModel.from_step_ratios(cal.latency, ratios)
    if latency is None:
        return None
    kw = {"noise": cal.noise, "seed": run.noise_seed, "wake": None}
    setup = with_loop(run.target.setup, cal)
    return run.target.simulate(setup, latency, run.arrival, run.workload, **kw)


def instance_cores(engine) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """The cores a disaggregated engine's prefill and decode instances are pinned to (None:
    a colocated engine, which runs on the harness's own threads)."""
    if not hasattr(engine, "prefills"):
        return None, None
    return engine.prefill(0).spec.cpu_cores, engine.decode(0).spec.cpu_cores


def warm_up(engine: EngineCore) -> None:
    """One request through the engine so first-step costs do not land on a measured one."""
    engine.add_request("warmup", [1] * 32, SamplingParams(temperature=0.0, max_tokens=4))
    while engine.has_unfinished_requests():
        engine.step(0.05)
