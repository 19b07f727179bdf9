"""The main loop of one TP/PP worker process (started by `distributed.launch.WorkerGroup`).

Commands from the driver (`worker.multiproc_executor`), one `worker.commands` dataclass
each, handled in order and dispatched on their type (`WorkerProcess.command_handlers`):

* `MeasureKVCommand` -> the blocks this rank's memory holds;
* `AllocateKVCommand` -> None, once the pool exists;
* `StepCommand` -> answered by the sampling rank only (the last stage's TP rank 0):
  ``(token_ids, logprobs, generator_states)``, the states (seq_id -> bytes) of the rows
  `StepSampling.report_generator_states` names, None when it names none. Stage k > 0
  receives the activations ``[num_tokens, hidden_size]`` of stage k - 1 (the same TP
  rank) before it runs; every stage processes steps in order, so stage 0 runs step i + 1
  while stage 1 runs step i;
* ``None`` (or EOF) -> exit.

Right after start-up every rank answers with its `ModelConfig` (the model is loaded).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist

from distserve_rt.config import EngineConfig
from distserve_rt.core.kv_cache import KVCacheSpec
from distserve_rt.distributed.launch import RankContext, recv_message, send_ok
from distserve_rt.layers.sampling_metadata import generator_state
from distserve_rt.logger import init_logger
from distserve_rt.sampling_params import SamplingParams
from distserve_rt.worker.commands import (
    AllocateKVCommand,
    MeasureKVCommand,
    StepCommand,
    dispatch,
)
from distserve_rt.worker.step_batch import StepBatch, StepSampling
from distserve_rt.worker.worker import Worker

logger = init_logger(__name__)


@dataclass(slots=True)
class SamplingState:
    """A request as the sampling rank knows it (a `worker.sampling.SamplingRequest`)."""

    sampling_params: SamplingParams
    generator: torch.Generator | None = None
    generator_state: bytes | None = None
    """A migrated stream, restored into `generator` at the first sampled row."""
    num_output_tokens: int = 0


class WorkerProcess:
    """One rank: its `Worker` (model stage, KV pool, runner) and, on the sampling rank, the
    per-request sampling state."""

    def __init__(
        self,
        ctx: RankContext,
        conn: Connection,
        config: EngineConfig,
        allocate_pool: Callable[[KVCacheSpec], torch.Tensor] | None = None,
        shared_gpu: bool = False,
    ) -> None:
        self.ctx = ctx
        self.conn = conn
        self.worker = Worker(
            config, allocate_pool=allocate_pool, parallel=ctx.parallel, device=ctx.device,
            shared_gpu=shared_gpu,
        )  # fmt: skip
        p = ctx.parallel
        self.is_sampler = p.is_last_stage and p.tp_rank == 0
        self.requests: dict[int, SamplingState] = {}
        self._pending_send: tuple[dist.Work, torch.Tensor] | None = None

    def run(self) -> None:
        send_ok(self.conn, self.worker.model_config)
        handlers = self.command_handlers()
        while (command := recv_message(self.conn)) is not None:
            dispatch(handlers, command)
        self._finish_send()

    def command_handlers(self) -> dict[type, Callable[[Any], None]]:
        """Command type -> handler (each answers on `conn` as its command says). Subclasses
        add theirs (the disaggregated instances' KV export and pulls)."""
        return {
            StepCommand: lambda c: self.step(c.batch, c.sampling),
            MeasureKVCommand: lambda c: send_ok(
                self.conn, self.worker.measure_kv_blocks(c.scheduler_config)
            ),
            AllocateKVCommand: self._allocate_kv,
        }

    def _allocate_kv(self, command: AllocateKVCommand) -> None:
        self.worker.allocate_kv_cache(command.scheduler_config, command.num_blocks)
        send_ok(self.conn)

    @torch.inference_mode()
    def step(self, batch: StepBatch, sampling: StepSampling) -> None:
        runner = self.worker.runner
        model_input = runner.prepare_batch(batch)
        intermediate = None
        if self.ctx.prev_rank is not None:
            hidden_size = self.worker.model_config.hidden_size
            intermediate = torch.empty(
                batch.num_tokens, hidden_size, dtype=runner.kv_pool.dtype, device=runner.device
            )
            dist.recv(intermediate, src=self.ctx.prev_rank)
        hidden = runner.run_model(model_input, intermediate)
        if self.ctx.next_rank is not None:
            self._send(hidden)
            return
        token_ids: list[int] = []
        logprobs = None
        rows = self._sampling_requests(sampling) if self.is_sampler else []
        # Every TP rank of the last stage joins the logits all-gather; one of them samples.
        if len(model_input.logits_rows):
            logits = runner.compute_logits(model_input, hidden)
            if self.is_sampler:
                sampled = self.worker.sample(logits, rows)
                token_ids, logprobs = sampled.token_ids.tolist(), sampled.logprobs
        if self.is_sampler:
            states = self._generator_states(sampling.report_generator_states)
            send_ok(self.conn, (token_ids, logprobs, states))

    def _sampling_requests(self, sampling: StepSampling) -> list[SamplingState]:
        for seq_id in sampling.finished:
            self.requests.pop(seq_id, None)
        for seq_id, params in sampling.new_params:
            self.requests[seq_id] = SamplingState(
                params, generator_state=sampling.generator_states.get(seq_id)
            )
        rows = []
        for seq_id, num_output in zip(
            sampling.seq_ids.tolist(), sampling.num_output_tokens.tolist(), strict=True
        ):
            state = self.requests[seq_id]
            state.num_output_tokens = num_output
            rows.append(state)
        return rows

    def _generator_states(self, seq_ids: list[int]) -> dict[int, bytes] | None:
        """The streams of these just-sampled seeded requests (the driver names only rows of
        this step with a seed, so each has its generator)."""
        if not seq_ids:
            return None
        states = {}
        for seq_id in seq_ids:
            generator = self.requests[seq_id].generator
            if generator is None:
                raise RuntimeError(f"seq {seq_id}: generator state asked for, but it has none")
            states[seq_id] = generator_state(generator)
        return states

    def _send(self, hidden: torch.Tensor) -> None:
        """Sends activations to the next stage without waiting for it to receive them (the
        previous send must have completed: one in flight keeps the tensor alive)."""
        self._finish_send()
        hidden = hidden.contiguous()
        self._pending_send = (dist.isend(hidden, dst=self.ctx.next_rank), hidden)

    def _finish_send(self) -> None:
        if self._pending_send is not None:
            self._pending_send[0].wait()
            self._pending_send = None


def run_worker(ctx: RankContext, conn: Connection, config: EngineConfig) -> None:
    """`distributed.launch.WorkerTarget` of the engine's workers."""
    WorkerProcess(ctx, conn, config).run()
