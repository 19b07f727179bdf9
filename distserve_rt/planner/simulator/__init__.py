"""Discrete-event simulator of disaggregated and colocated serving (see each module)."""

from distserve_rt.planner.simulator.colocated import ColocatedPolicy, ColocatedSimulator
from distserve_rt.planner.simulator.disaggregated import DisaggregatedSimulator
from distserve_rt.planner.simulator.results import BREAKDOWN, SimResult
from distserve_rt.planner.simulator.spec import (
    DisaggSpec,
    KVTransferSpec,
    SimInstanceSpec,
    SimMode,
    StepOverhead,
)

__all__ = [
    "BREAKDOWN",
    "ColocatedPolicy",
    "ColocatedSimulator",
    "DisaggSpec",
    "DisaggregatedSimulator",
    "SimInstanceSpec",
    "KVTransferSpec",
    "SimMode",
    "SimResult",
    "StepOverhead",
]
