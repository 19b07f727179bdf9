"""The executor seam: the engine hands it a step, it returns the sampled tokens.

`UniprocExecutor` runs one worker in the engine's process (TP = PP = 1).
`worker.multiproc_executor.MultiprocExecutor` implements the same interface over TP x PP
worker processes: it ships the step to its workers and returns the last stage's output.

Steps can be in flight: ``execute_async`` submits one and returns a handle, ``wait`` returns
its output; outputs are waited for in submission order. A pipeline of k stages needs k
steps in flight to keep every stage busy (the engine's virtual engines provide them). The
default ``execute_async`` runs the step at once (one in flight), so an executor that only
implements ``execute`` still works with one virtual engine.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

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

    def execute_async(self, scheduler_output: SchedulerOutput, block_offset: int = 0) -> object:
        """Submits a step; returns the handle to `wait` on. ``block_offset`` is added to
        every block id of the step (the virtual engine's share of the pool)."""
        if block_offset:
            raise NotImplementedError(
                f"{type(self).__name__} runs one virtual engine (block_offset 0), got "
                f"block_offset={block_offset}"
            )
        return _Done(self.execute(scheduler_output))

    def wait(self, handle: object) -> ModelRunnerOutput:
        """The output of a submitted step (handles are waited for in submission order)."""
        if not isinstance(handle, _Done):
            raise ValueError(f"not a handle of this executor: {handle!r}")
        return handle.output

    def release_requests(self, seq_ids: Sequence[int]) -> None:  # noqa: B027 (optional hook)
        """These requests finished: drop any state kept for them (remote sampling state)."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Releases the workers and their memory; the executor is unusable afterwards."""


class _Done:
    """Handle of a step that already ran."""

    __slots__ = ("output",)

    def __init__(self, output: ModelRunnerOutput) -> None:
        self.output = output


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
