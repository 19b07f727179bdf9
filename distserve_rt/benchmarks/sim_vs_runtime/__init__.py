"""Simulator vs runtime: the same requests at the same arrival times, simulated with a
measured latency profile and served by the real engine; SLO attainment compared.

A gap between the two measures the latency model (and the host overheads it leaves out),
provided both sides run the same policy. Each compared deployment is a `Target`
(targets.py: colocated continuous batching or chunked prefill, disaggregated 1P1D) with
its simulator; `replay` (replay.py) drives any `EngineCore`; the drift probe (drift.py)
separates the machine's slowdown from the model's error; repeats.py aggregates repeats.
The script is ``bench/sim_vs_runtime.py``.
"""

from distserve_rt.benchmarks.sim_vs_runtime.drift import DriftProbe, ProbeTimes, ScaledLatencyModel
from distserve_rt.benchmarks.sim_vs_runtime.latencies import RunLatencies
from distserve_rt.benchmarks.sim_vs_runtime.repeats import spread, summarize_repeats
from distserve_rt.benchmarks.sim_vs_runtime.replay import replay
from distserve_rt.benchmarks.sim_vs_runtime.targets import (
    SIMULATORS,
    ColocatedSetup,
    DisaggSetup,
    SimulateFn,
    Target,
    default_simulator,
    simulate_colocated,
    simulate_colocated_driven,
    simulate_disaggregated,
    simulate_disaggregated_driven,
)

__all__ = [
    "ColocatedSetup",
    "DisaggSetup",
    "DriftProbe",
    "ProbeTimes",
    "RunLatencies",
    "SIMULATORS",
    "ScaledLatencyModel",
    "SimulateFn",
    "Target",
    "default_simulator",
    "replay",
    "simulate_colocated",
    "simulate_colocated_driven",
    "simulate_disaggregated",
    "simulate_disaggregated_driven",
    "spread",
    "summarize_repeats",
]
