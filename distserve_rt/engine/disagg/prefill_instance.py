"""A prefill instance: FCFS prefill batches; the first token of each request is sent at once;
its KV is announced and held in the (exported) pool until a decode instance pulled it."""

from __future__ import annotations

import time

import torch

from distserve_rt.core.kv_cache import KVCacheSpec
from distserve_rt.core.request import Request, RequestStatus
from distserve_rt.core.scheduler.prefill import PrefillScheduler
from distserve_rt.engine.disagg import messages as msg
from distserve_rt.engine.disagg.instance import Instance, InstanceSpec
from distserve_rt.engine.disagg.rank_kv import ExportKVCommand
from distserve_rt.engine.step_isolation import execute_isolated
from distserve_rt.layers.sampling_metadata import generator_state
from distserve_rt.worker.model_runner import ModelRunnerOutput


class PrefillInstance(Instance):
    def __init__(self, spec: InstanceSpec) -> None:
        super().__init__(spec)
        self.scheduler = PrefillScheduler(self.scheduler_config, self.block_manager)
        # The pool is in this process (TP = PP = 1) or one per rank in the worker processes.
        self.pool = None if self.worker is None else self.worker.kv_pool
        if self.pool is not None:
            self.descriptors = [self.transport.register_pool(self.pool).to_bytes()]
        else:
            self.descriptors = self.executor.broadcast(ExportKVCommand())  # type: ignore[attr-defined]
        self._lease_s = spec.disagg_config.kv_lease_timeout_s

    def _allocate_pool(self, spec: KVCacheSpec) -> torch.Tensor:
        return self.transport.allocate_pool(spec)  # decode instances read it

    def ready_message(self) -> msg.Ready:
        return msg.Ready(
            self.spec.name, self.model_config, self.block_manager.num_blocks, self.descriptors
        )

    def handle(self, message: object, now: float) -> None:
        if isinstance(message, msg.NewRequest):
            self.scheduler.add_request(self.make_request(message))
        elif isinstance(message, msg.ReleaseKV):
            self.scheduler.release_migration(message.request_id)
        elif isinstance(message, msg.Abort):
            # A request awaiting migration is not touched: its decode instance answers.
            self.scheduler.abort_request(message.request_id, now)
        else:
            raise ValueError(f"{self.spec.name} got an unexpected message {message!r}")

    def step(self, now: float) -> None:
        step_start = time.perf_counter()
        out = self.scheduler.schedule(now)
        for request in out.finished:  # aborted or rejected
            self.release(request)
            self.outbox.append(self.finished_tokens(request, now))
        if not out.is_empty:
            # A request that fails the step alone is reported failed; the rest go on.
            execute_start = time.perf_counter()
            isolated = execute_isolated(self.executor, out, self.model_config.vocab_size)
            execute_s = time.perf_counter() - execute_start
            if self.pool is not None:  # (worker processes mark their own pools)
                self.transport.mark_ready(self.pool)  # pulls announced from now on see the KV
            end = self.clock()  # the lease starts at `end`: on the clock expiry reads
            for request, error in isolated.failed:
                self._fail(request, error, end)
            result = isolated.runner_output
            update = self.scheduler.update_from_output(
                isolated.scheduler_output, result.sampled_token_ids, result.logprobs, end
            )
            for request in update.updated:
                self._announce(request, now, end, result)
            self.record_step(out, step_start, execute_s)
        for request in self.scheduler.expired_leases(now, self._lease_s):
            self.outbox.append(msg.LeaseExpired(request.request_id))

    def _fail(self, request: Request, error: str, now: float) -> None:
        request.error = error
        self.scheduler.finish_request(request, RequestStatus.FINISHED_ERROR, now)
        self.release(request)
        self.outbox.append(self.finished_tokens(request, now))

    def _announce(
        self, request: Request, start: float, end: float, result: ModelRunnerOutput
    ) -> None:
        """Reports the first token; its KV's blocks too, unless it stopped at it (the
        scheduler's `update_from_output` finished it, or its migration started)."""
        seeded_stream = _generator_state_of(request, result)
        self.release(request)  # its next token is sampled by a decode instance
        done = msg.PrefillDone(request.request_id, request.token_ids[-1], end, start)
        if request.logprobs is not None:
            done.logprobs = request.logprobs[-1]
        done.generator_state = seeded_stream
        if request.is_finished:
            done.finish_reason = request.finish_reason
            done.stop_reason = request.stop_reason
        else:
            block_ids = self.scheduler.block_ids(request)
            done.block_ids = block_ids.tolist()
        self.outbox.append(done)

    def poll_interval_s(self) -> float:
        # Waiting requests may be held back by a full pool: re-check soon, without spinning.
        return 0.0005 if self.scheduler.num_waiting else 0.02

    def status(self) -> msg.InstanceStatus:
        s = self.scheduler
        bm = self.block_manager
        kv = bm.stats()
        return msg.InstanceStatus(
            s.num_running, s.num_waiting, kv.num_free_blocks, kv.usage,
            prefix_cache_queries=kv.prefix_cache_queries, prefix_cache_hits=kv.prefix_cache_hits,
        )  # fmt: skip


def _generator_state_of(request: Request, result: ModelRunnerOutput) -> bytes | None:
    """A seeded request's generator state after its first token (None when unseeded): from
    the executor's sampling worker (TP x PP), else from the request (in this process)."""
    if request.sampling_params.seed is None:
        return None
    if result.generator_states is not None:  # it reports every seeded row (KeyError if not)
        return result.generator_states[request.seq_id]
    assert request.generator is not None  # the sampler made it for the first token
    return generator_state(request.generator)
