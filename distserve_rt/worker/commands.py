"""The commands a driver (`worker.multiproc_executor.MultiprocExecutor`) sends to its
worker processes (`worker.worker_process.WorkerProcess`), one frozen dataclass each.

Each is pickled once per send and answered as its docstring says. A worker dispatches on
the command's type (`WorkerProcess.command_handlers`); subclasses register their own
commands there (the disaggregated instances' KV export and pulls: `engine.disagg.rank_kv`).
Exit is not a command: the launch layer sends None (`distributed.launch`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from distserve_rt.core.scheduler import SchedulerConfig
from distserve_rt.worker.step_batch import StepBatch, StepSampling


@dataclass(frozen=True, slots=True)
class MeasureKVCommand:
    """-> the number of KV blocks this rank's memory holds for these limits."""

    scheduler_config: SchedulerConfig


@dataclass(frozen=True, slots=True)
class AllocateKVCommand:
    """-> None, once this rank's pool of `num_blocks` blocks exists."""

    scheduler_config: SchedulerConfig
    num_blocks: int


@dataclass(frozen=True, slots=True)
class StepCommand:
    """Runs one step. Answered by the sampling rank only (the last stage's TP rank 0):
    ``(token_ids, logprobs, generator_states)`` (see `worker.worker_process`)."""

    batch: StepBatch
    sampling: StepSampling


Handlers = Mapping[type, Callable[[Any], None]]


def dispatch(handlers: Handlers, command: object) -> None:
    """Runs the handler of `command`'s exact type; a command no handler takes is a driver
    bug (or a driver and workers of different versions), so it raises instead of skipping."""
    handler = handlers.get(type(command))
    if handler is None:
        names = ", ".join(sorted(t.__name__ for t in handlers))
        raise ValueError(
            f"unknown worker command {type(command).__name__} ({command!r:.80}); "
            f"this worker handles {names}"
        )
    handler(command)
