"""Batching policies over one instance's queues and KV blocks (one policy per file)."""

from __future__ import annotations

from distserve_rt.config.scheduler import POLICY_NAMES
from distserve_rt.core.block_manager import BlockManager
from distserve_rt.core.scheduler.base import SchedulerBase
from distserve_rt.core.scheduler.chunked_prefill import ChunkedPrefillScheduler
from distserve_rt.core.scheduler.continuous_batching import ContinuousBatchingScheduler
from distserve_rt.core.scheduler.decode import DecodeScheduler
from distserve_rt.core.scheduler.interface import (
    ScheduledPrefill,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    StepUpdate,
)
from distserve_rt.core.scheduler.prefill import MigrationLease, PrefillScheduler

POLICIES: dict[str, type[SchedulerBase]] = {
    "continuous_batching": ContinuousBatchingScheduler,
    "chunked_prefill": ChunkedPrefillScheduler,
}
# EngineConfig validates `policy` against the names in config; a policy added here alone
# would be refused there.
assert tuple(POLICIES) == POLICY_NAMES, (tuple(POLICIES), POLICY_NAMES)


def make_scheduler(policy: str, config: SchedulerConfig, block_manager: BlockManager) -> Scheduler:
    """The scheduler of a colocated instance for `policy` (a key of `POLICIES`)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {policy!r}")
    return POLICIES[policy](config, block_manager)


__all__ = [
    "POLICIES",
    "ChunkedPrefillScheduler",
    "ContinuousBatchingScheduler",
    "DecodeScheduler",
    "MigrationLease",
    "PrefillScheduler",
    "ScheduledPrefill",
    "Scheduler",
    "SchedulerBase",
    "SchedulerConfig",
    "SchedulerOutput",
    "StepUpdate",
    "make_scheduler",
]
