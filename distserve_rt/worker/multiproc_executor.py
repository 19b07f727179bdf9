"""`MultiprocExecutor`: one instance's TP x PP workers, each in its own process.

The engine's process is the driver and holds no model. Per step it ships, to every rank,
the step's arrays (`StepBatch`, pickled once) and the sampling update (`StepSampling`:
each request's `SamplingParams` once, then only seq ids and counts; finished ids to drop).
Ranks build their inputs, stage k > 0 receives stage k - 1's activations, the last stage
computes logits and its TP rank 0 samples with per-request generators (so seeded sampling
gives the tokens of TP = PP = 1) and answers with the tokens (see `worker.worker_process`).
Seeded streams cross the process boundary only for disaggregated instances: a migrated
request's `Request.generator_state` ships with its parameters, and a prefill instance's
executor (`report_generator_states`) gets each seeded request's state back with its token.

Steps are answered in submission order; ``execute_async`` returns at once, so up to
``pipeline_parallel_size`` steps of different virtual engines are in flight
(`max_num_in_flight` records the most seen, for tests and stats).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from distserve_rt.config import EngineConfig
from distserve_rt.config.parallelism import check_parallel_sizes
from distserve_rt.core.scheduler import SchedulerConfig, SchedulerOutput
from distserve_rt.distributed.launch import LaunchConfig, RankStarter, WorkerGroup, WorkerTarget
from distserve_rt.models.config import ModelConfig
from distserve_rt.models.loader import DUMMY_PREFIX, read_hf_config
from distserve_rt.models.presets import get_preset
from distserve_rt.worker.commands import AllocateKVCommand, MeasureKVCommand, StepCommand
from distserve_rt.worker.executor import Executor
from distserve_rt.worker.model_runner import ModelRunnerOutput
from distserve_rt.worker.step_batch import StepBatch, StepSampling
from distserve_rt.worker.worker_process import run_worker


class MultiprocExecutor(Executor):
    """Starts ``tensor_parallel_size * pipeline_parallel_size`` worker processes.

    Args:
        config: the engine configuration (each worker loads its shard of `config.model`).
        launch: overrides how the processes start (threads, pinning, timeout); derived from
            `config` when None.
        target: the worker processes' entry point (`run_worker`; disaggregated instances
            pass one that also exports or pulls KV, see `engine.disagg.rank_kv`).
        target_config: the typed per-worker settings `target` takes after `config`
            (`engine.disagg.rank_kv.KVRankConfig`); None: `target` takes only `config`.
        report_generator_states: every step's output carries the generator state of each
            seeded request it sampled (`ModelRunnerOutput.generator_states`): a prefill
            instance hands it to the decode instance. Off by default (a few KiB per seeded
            row, which only migrating requests need).
        starter: how the ranks start (None: spawned on this machine; an instance whose PP
            stages span Ray nodes passes `distributed.ray_ranks.RayRankStarter`).

    Raises ValueError before starting any process when the sizes do not fit the model or
    the machine; `distributed.launch.WorkerFailedError` when a worker fails to start.
    """

    def __init__(
        self,
        config: EngineConfig,
        launch: LaunchConfig | None = None,
        target: WorkerTarget = run_worker,
        target_config: object | None = None,
        *,
        report_generator_states: bool = False,
        starter: RankStarter | None = None,
    ) -> None:
        tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
        launch = launch or LaunchConfig(tp_size=tp, pp_size=pp, device=config.device)
        if (launch.tp_size, launch.pp_size) != (tp, pp):
            raise ValueError(
                f"launch sizes (tp={launch.tp_size}, pp={launch.pp_size}) differ from the "
                f"config's (tp={tp}, pp={pp})"
            )
        mc = load_model_config(config.model)
        check_parallel_sizes(mc.num_heads, mc.num_kv_heads, mc.num_layers, tp, pp)
        self._timeout_s = launch.timeout_s
        args = (config,) if target_config is None else (config, target_config)
        self._group: WorkerGroup | None = WorkerGroup(launch, target, args, starter)
        self.processes = list(self._group.processes)
        """The worker processes, rank order (kept after `shutdown`, to check they exited)."""
        try:
            self._model_config: ModelConfig = self._group.gather(self._timeout_s)[0]
        except BaseException:
            self.shutdown()
            raise
        self._sampler_rank = (pp - 1) * tp  # last stage, TP rank 0
        self._block_size = config.block_size
        self._report_generator_states = report_generator_states
        self._shipped: set[int] = set()  # seq ids whose SamplingParams the sampler has
        self._finished: list[int] = []  # shipped seq ids to drop with the next step
        self._num_submitted = 0
        self._num_answered = 0
        self._answers: dict[int, ModelRunnerOutput] = {}
        self.max_num_in_flight = 0

    @property
    def model_config(self) -> ModelConfig:
        return self._model_config

    @property
    def group(self) -> WorkerGroup:
        if self._group is None:
            raise RuntimeError("the executor was shut down")
        return self._group

    @property
    def num_in_flight(self) -> int:
        return self._num_submitted - self._num_answered

    def init_kv_cache(self, scheduler_config: SchedulerConfig) -> int:
        group = self.group
        group.send(range(group.world_size), MeasureKVCommand(scheduler_config))
        num_blocks = min(group.gather(self._timeout_s))
        group.send(range(group.world_size), AllocateKVCommand(scheduler_config, num_blocks))
        group.gather(self._timeout_s)
        return num_blocks

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.wait(self.execute_async(scheduler_output))

    def execute_async(self, scheduler_output: SchedulerOutput, block_offset: int = 0) -> int:
        batch = StepBatch.from_scheduler_output(scheduler_output)
        if block_offset:
            batch.shift_blocks(block_offset, self._block_size)
        group = self.group
        command = StepCommand(batch, self._sampling(scheduler_output))
        group.send(range(group.world_size), command)
        handle = self._num_submitted
        self._num_submitted += 1
        self.max_num_in_flight = max(self.max_num_in_flight, self.num_in_flight)
        return handle

    def wait(self, handle: object) -> ModelRunnerOutput:
        if not isinstance(handle, int) or not 0 <= handle < self._num_submitted:
            raise ValueError(f"not a pending step handle of this executor: {handle!r}")
        while handle not in self._answers:
            if self._num_answered > handle:
                raise ValueError(f"step {handle} was already waited for")
            token_ids, logprobs, states = self.group.recv(self._sampler_rank)
            self._answers[self._num_answered] = ModelRunnerOutput(token_ids, logprobs, states)
            self._num_answered += 1
        return self._answers.pop(handle)

    def broadcast(self, command: object) -> list:
        """Sends `command` to every rank and returns their answers, rank order (commands
        `target`'s workers register beyond `worker.commands`). Only between steps:
        answers would interleave."""
        if self.num_in_flight:
            raise RuntimeError(f"broadcast with {self.num_in_flight} steps in flight")
        group = self.group
        group.send(range(group.world_size), command)
        return group.gather(self._timeout_s)

    def release_requests(self, seq_ids: Sequence[int]) -> None:
        for seq_id in seq_ids:
            if seq_id in self._shipped:
                self._shipped.discard(seq_id)
                self._finished.append(seq_id)

    def _sampling(self, out: SchedulerOutput) -> StepSampling:
        requests = out.sampling_requests()
        shipped = self._shipped
        new = [r for r in requests if r.seq_id not in shipped]
        self._shipped.update(r.seq_id for r in new)
        finished, self._finished = self._finished, []
        generator_states = {}
        for r in new:
            if r.generator_state is not None:  # the sampling worker restores it
                generator_states[r.seq_id], r.generator_state = r.generator_state, None
        report = []
        if self._report_generator_states:
            report = [r.seq_id for r in requests if r.sampling_params.seed is not None]
        return StepSampling(
            seq_ids=np.fromiter((r.seq_id for r in requests), np.int64, len(requests)),
            num_output_tokens=np.fromiter(
                (r.num_output_tokens for r in requests), np.int64, len(requests)
            ),
            new_params=[(r.seq_id, r.sampling_params) for r in new],
            finished=finished,
            generator_states=generator_states,
            report_generator_states=report,
        )

    def shutdown(self) -> None:
        if self._group is not None:
            self._group.shutdown()
            self._group = None


def load_model_config(model: str) -> ModelConfig:
    """The model's shape without loading weights (a preset, or the directory's config.json)."""
    if model.startswith(DUMMY_PREFIX):
        return get_preset(model[len(DUMMY_PREFIX) :])
    directory = Path(model)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"model {model!r} is neither 'dummy:<preset>' nor a directory with config.json"
        )
    return ModelConfig.from_hf_config(read_hf_config(directory), name=str(directory))
