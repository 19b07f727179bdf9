"""The executor seam: the engine hands it a step, it returns the sampled tokens.

`UniprocExecutor` runs one worker in the engine's process (TP = PP = 1). A multi-process
TP/PP executor implements the same interface: it broadcasts the step to its workers and
returns the last stage's output, so the engine does not change.
"""

from __future__ import annotations

import abc

from distserve_rt.core.scheduler import SchedulerConfig, SchedulerOutput
from distserve_rt.models.config import ModelConfig
from distserve_rt.worker.model_runner import ModelRunnerOutput
from distserve_rt.worker.worker import Worker


class Executor(abc.ABC):
    """Runs scheduled steps on the instance's devices."""

    @property
    @abc.abstractmethod
    def model_config(self) -> ModelConfig:
        """The whole model's shape (the engine resolves context length and vocab from it)."""

    @abc.abstractmethod
    def init_kv_cache(self, scheduler_config: SchedulerConfig) -> int:
        """Sizes and allocates the KV pools of every worker for these limits; returns the
        block count (the smallest over the workers, so every pool holds every block id)."""

    @abc.abstractmethod
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Runs one step: prepare inputs -> model -> sample. The output has one token per
        request of ``scheduler_output.sampling_requests()``."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Releases the workers and their memory; the executor is unusable afterwards."""


class UniprocExecutor(Executor):
    """One worker in this process."""

    def __init__(self, worker: Worker) -> None:
        self._worker: Worker | None = worker

    @property
    def model_config(self) -> ModelConfig:
        return self.worker.model_config

    @property
    def worker(self) -> Worker:
        if self._worker is None:
            raise RuntimeError("the executor was shut down")
        return self._worker

    def init_kv_cache(self, scheduler_config: SchedulerConfig) -> int:
        return self.worker.init_kv_cache(scheduler_config)

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute(scheduler_output)

    def shutdown(self) -> None:
        self._worker = None
