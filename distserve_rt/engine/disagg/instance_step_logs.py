"""The instances' step logs, as the controller gathers them.

`LLMEngine.enable_step_log` records a colocated engine's steps in its own process; a
disaggregated engine's steps run in its instances' processes, so `Controller.enable_step_log`
starts a log in each (`messages.StepLogControl`) and `InstanceStepLogs.records` stops them
and gathers what they hold (`messages.StepLogRecords`). The simulator's comparison reads
them to tell a step-time gap from a scheduling one in 1P1D as it does colocated.
"""

from __future__ import annotations

from collections.abc import Callable

from distserve_rt.engine.step_log import StepRecord

Collect = Callable[[float], dict[str, list[dict]]]


class InstanceStepLogs:
    """Handed out by `Controller.enable_step_log`. ``collect(timeout_s)`` stops the live
    instances' logs and returns their records by instance name (the controller's)."""

    def __init__(self, collect: Collect) -> None:
        self._collect = collect
        self._by_instance: dict[str, list[StepRecord]] | None = None

    def by_instance(self, timeout_s: float = 30.0) -> dict[str, list[StepRecord]]:
        """Each instance's steps, oldest first; the first call stops the logs."""
        if self._by_instance is None:
            raw = self._collect(timeout_s)
            self._by_instance = {
                name: [StepRecord.from_dict(r) for r in records] for name, records in raw.items()
            }
        return self._by_instance

    def records(self, timeout_s: float = 30.0) -> list[StepRecord]:
        """Every instance's steps (prefill instances' are prefill steps, decode instances'
        decode steps, or mixed ones for local prefills): what `LLMEngine`'s log holds."""
        return [r for records in self.by_instance(timeout_s).values() for r in records]
