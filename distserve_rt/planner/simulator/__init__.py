"""Discrete-event simulators of disaggregated and colocated serving (see each module).

Two kinds: the fast screening simulators (`ColocatedSimulator`, `DisaggregatedSimulator`:
the policies re-stated analytically, decode steps jumped over in closed form) and the
scheduler-driven ones (`SchedulerDrivenColocated`, `SchedulerDrivenDisaggregated`: the
runtime's own `core` schedulers on a simulated clock, so admission, budgets, watermark
and preemption are the runtime's by construction; pp=1 only).
"""

from distserve_rt.planner.simulator.colocated import ColocatedPolicy, ColocatedSimulator
from distserve_rt.planner.simulator.conversations import ConversationSimResult
from distserve_rt.planner.simulator.disaggregated import DisaggregatedSimulator
from distserve_rt.planner.simulator.driven_colocated import SchedulerDrivenColocated
from distserve_rt.planner.simulator.driven_disaggregated import SchedulerDrivenDisaggregated
from distserve_rt.planner.simulator.driven_instance import StepNoise
from distserve_rt.planner.simulator.results import BREAKDOWN, SimResult
from distserve_rt.planner.simulator.spec import (
    DisaggSpec,
    KVTransferSpec,
    ProcessHops,
    SimInstanceSpec,
    SimMode,
    StepOverhead,
)

__all__ = [
    "BREAKDOWN",
    "ColocatedPolicy",
    "ColocatedSimulator",
    "ConversationSimResult",
    "DisaggSpec",
    "DisaggregatedSimulator",
    "SchedulerDrivenColocated",
    "SchedulerDrivenDisaggregated",
    "SimInstanceSpec",
    "KVTransferSpec",
    "ProcessHops",
    "SimMode",
    "SimResult",
    "StepNoise",
    "StepOverhead",
]
