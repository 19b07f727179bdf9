"""`LLMEngine`: one colocated instance (prefill and decode on the same devices).

A step is small methods in sequence::

    schedule (policy, KV blocks)  ->  execute (prepare inputs -> model -> sample)
                                  ->  postprocess (append tokens, stops, free, outputs)

With ``pipeline_parallel_size = k`` the engine has k virtual engines (`engine.virtual_engine`):
`step` first submits a batch for every virtual engine that has none in flight, then waits
for the oldest batch and postprocesses it, so up to k batches move through the stages.
With k = 1 this is exactly schedule -> execute -> postprocess.

Not thread-safe: one caller drives `step` (the async front end runs it in one loop).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Sequence

from distserve_rt.config import EngineConfig
from distserve_rt.core.block_manager import BlockManager
from distserve_rt.core.detokenizer import IncrementalDetokenizer
from distserve_rt.core.request import Request, RequestStatus
from distserve_rt.core.scheduler import Scheduler, SchedulerOutput
from distserve_rt.core.stop_checker import StopChecker
from distserve_rt.distributed.launch import WorkerFailedError
from distserve_rt.engine.parallel_sampling import SequenceGroup, sequence_ids, sequence_params
from distserve_rt.engine.protocol import EngineDeadError, EngineStats, InstanceStats
from distserve_rt.engine.request_checks import check_request
from distserve_rt.engine.stats import StatsLogger
from distserve_rt.engine.step_isolation import (
    GeneratorSnapshot,
    IsolatedStep,
    check_sampled,
    isolate_failure,
)
from distserve_rt.engine.step_log import StepLog
from distserve_rt.engine.virtual_engine import (
    VirtualEngine,
    combined_kv_stats,
    least_loaded,
    make_virtual_engines,
)
from distserve_rt.logger import init_logger
from distserve_rt.models.interface import CausalLM
from distserve_rt.outputs import RequestOutput
from distserve_rt.sampling_params import SamplingParams
from distserve_rt.worker.executor import Executor, UniprocExecutor
from distserve_rt.worker.model_runner import ModelRunnerOutput, SampleFn
from distserve_rt.worker.multiproc_executor import MultiprocExecutor
from distserve_rt.worker.worker import Worker

logger = init_logger(__name__)


class LLMEngine:
    """Colocated engine: requests in, `RequestOutput`s out, one `step` at a time.

    Args:
        config: the engine configuration.
        model: a prebuilt model (tests); `config.model` is loaded when None.
        sample: the sampling function of the runner (greedy by default).
        executor: a prebuilt executor (benchmarks pass one without a model); built from
            `config` when None: a `UniprocExecutor`, or a `MultiprocExecutor` when
            tensor_parallel_size * pipeline_parallel_size > 1.
        tokenizer: detokenizes outputs incrementally (stop strings, streaming); None keeps
            token ids only (text '', stop strings refused).
    """

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        model: CausalLM | None = None,
        sample: SampleFn | None = None,
        executor: Executor | None = None,
        tokenizer=None,
    ) -> None:
        self.config = config = config or EngineConfig()
        if config.data_parallel_size != 1:  # never serve one replica for N silently
            raise ValueError(
                f"LLMEngine is one replica, got data_parallel_size={config.data_parallel_size}; "
                "build it with engine.core.make_engine_core (DataParallelCore)"
            )
        self.executor = executor or make_executor(config, model, sample)
        self.model_config = self.executor.model_config
        self.scheduler_config = config.scheduler_config(self.model_config.max_position_embeddings)
        self.num_blocks = num_blocks = self.executor.init_kv_cache(self.scheduler_config)
        """KV blocks of each virtual engine's pool."""
        self.virtual_engines = make_virtual_engines(
            config.pipeline_parallel_size,
            num_blocks,
            config.block_size,
            config.watermark,
            config.policy,
            self.scheduler_config,
            config.enable_prefix_caching,
        )
        # (virtual engine, its batch, executor handle or None when nothing ran, the batch's
        # seeded streams before it ran), oldest first
        self._in_flight: deque[
            tuple[VirtualEngine, SchedulerOutput, object, GeneratorSnapshot | None]
        ] = deque()
        self.tokenizer = tokenizer
        self._requests: dict[str, Request] = {}
        # Every sequence id of a request with n > 1 or best_of -> its group.
        self._groups: dict[str, SequenceGroup] = {}
        self._streaming: set[str] = set()
        self._seq_ids = itertools.count()
        self._stats = StatsLogger(logger, config.log_stats_interval_s)
        self._closed = False
        self._snapshot = self._take_stats()
        self.step_log: StepLog | None = None
        """Each executed step's batch shape and duration; None (the default) = not recorded,
        `enable_step_log` starts it (`drt-run profile` fits the latency model from it)."""
        self._execute_s = 0.0  # executor time of the current step, kept while step_log is on
        self._completed: SchedulerOutput | None = None  # the batch the current step finished

    def enable_step_log(self, capacity: int) -> StepLog:
        """Starts recording steps into a fresh ring buffer of ``capacity`` steps."""
        self.step_log = StepLog(capacity)
        return self.step_log

    def disable_step_log(self) -> None:
        """Stops recording steps (the `StepLog` returned keeps what it holds)."""
        self.step_log = None

    @property
    def scheduler(self) -> Scheduler:
        """Virtual engine 0's scheduler (the only one unless pipeline_parallel_size > 1)."""
        return self.virtual_engines[0].scheduler

    @property
    def block_manager(self) -> BlockManager:
        """Virtual engine 0's block manager (the only one unless pipeline_parallel_size > 1)."""
        return self.virtual_engines[0].block_manager

    # ---- requests ---------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams | None = None,
        *,
        prompt: str | None = None,
        arrival_time: float | None = None,
        stream: bool = False,
    ) -> Request:
        """Queues a request. `stream`: `step` returns its output after every token (else
        only when it finishes). A request that can never be served (prompt too long for
        the context or the KV pool) finishes with finish_reason "error"; invalid arguments
        raise ValueError (`request_checks.check_request`, shared with the disaggregated
        controller)."""
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        token_ids, params = check_request(
            request_id,
            prompt,
            prompt_token_ids,
            sampling_params or SamplingParams(),
            self.model_config,
        )
        max_model_len = self.scheduler_config.max_model_len
        # Raises ValueError for stop strings without a tokenizer, before anything is queued.
        checker = None if len(token_ids) >= max_model_len else self._stop_checker(params, token_ids)
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        if params.num_sequences == 1:
            request = self._new_request(request_id, token_ids, params, arrival_time, prompt)
            request.stop_checker = checker
        else:
            request = self._new_group(request_id, token_ids, params, arrival_time, prompt)
        self._requests[request_id] = request
        if stream:
            self._streaming.update(r.request_id for r in (request, *request.forks))
        least_loaded(self.virtual_engines).scheduler.add_request(request)
        return request

    def _new_request(
        self,
        request_id: str,
        token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        prompt: str | None,
    ) -> Request:
        # No stop checker yet: the caller sets it (none when the prompt leaves no room in
        # the context: the scheduler rejects the request).
        request = Request(
            request_id,
            next(self._seq_ids),
            token_ids,
            params,
            arrival_time,
            self.scheduler_config.max_model_len,
            prompt=prompt,
        )
        if params.logprobs is not None:
            request.logprobs = []
        return request

    def _new_group(
        self,
        request_id: str,
        token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        prompt: str | None,
    ) -> Request:
        """The sequences of a request with n > 1 or best_of (`engine.parallel_sampling`):
        returns sequence 0, which carries the others as its pending forks."""
        ids = sequence_ids(
            request_id,
            params,
            self.scheduler_config.max_num_seqs,
            lambda i: i in self._groups or i in self._requests,
        )
        max_model_len = self.scheduler_config.max_model_len
        sequences = []
        for index, seq_request_id in enumerate(ids):
            seq_params = sequence_params(params, index)
            sequence = self._new_request(
                seq_request_id, token_ids, seq_params, arrival_time, prompt
            )
            if len(token_ids) < max_model_len:
                sequence.stop_checker = self._stop_checker(seq_params, token_ids)
            sequences.append(sequence)
        group = SequenceGroup(params, sequences)
        for sequence in sequences:
            self._groups[sequence.request_id] = group
        sequences[0].forks = sequences[1:]
        return sequences[0]

    def abort_request(self, request_id: str) -> bool:
        """Aborts a live request (finish_reason "abort", reported by the next `step`);
        False when it is unknown or already finished."""
        now = time.monotonic()
        group = self._groups.get(request_id)
        ids = [request_id] if group is None else [s.request_id for s in group.sequences]
        # A list, not any(): every sequence of a group is aborted.
        aborted = [
            ve.scheduler.abort_request(i, now) is not None
            for i in ids
            for ve in self.virtual_engines
        ]
        return any(aborted)

    def has_unfinished_requests(self) -> bool:
        return bool(self._in_flight) or any(
            ve.scheduler.has_unfinished_requests() for ve in self.virtual_engines
        )

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._requests)

    # ---- the step -----------------------------------------------------------------------

    def step(self, timeout_s: float = 0.0) -> list[RequestOutput]:
        """Runs one step (nothing without requests); returns the outputs of finished (and
        streaming) requests. `timeout_s` is unused: a colocated step computes, it never
        waits for messages (`EngineCore`)."""
        if self.step_log is None:
            outputs = self._step() if self.has_unfinished_requests() else []
        else:
            outputs = self._logged_step()
        self._snapshot = self._take_stats()
        return outputs

    def _logged_step(self) -> list[RequestOutput]:
        """`_step`, timed: the whole step and its executor part go into `step_log`."""
        if not self.has_unfinished_requests():
            return []
        self._execute_s, self._completed = 0.0, None
        t0 = time.perf_counter()
        outputs = self._step()
        duration_s = time.perf_counter() - t0
        if self._completed is not None and self.step_log is not None:
            self.step_log.record(self._completed, duration_s, self._execute_s, t0)
        return outputs

    def _step(self) -> list[RequestOutput]:
        """One step of the virtual engines.

        Submits a batch for every idle virtual engine, then completes the oldest batch. A
        batch that raises is narrowed down to the requests that fail alone
        (`step_isolation`): they finish with finish_reason "error", the rest of the batch
        gets its tokens. A dead executor (`WorkerFailedError`) fails its batch, then raises."""
        self._stats.observe(busy=True)  # opens the busy window at the first step after idle
        self._submit_idle()
        if not self._in_flight:
            self._stats.observe(busy=False)
            return []
        ve, scheduler_output, handle, snapshot = self._in_flight.popleft()
        ve.busy = False
        self._completed = scheduler_output
        try:
            step = self._complete(ve, scheduler_output, handle, snapshot)
        except Exception as exc:  # noqa: BLE001 - engine-fatal, or isolation itself broke
            outputs = self._fail_step(ve, scheduler_output, exc, time.monotonic())
            if isinstance(exc, WorkerFailedError):
                raise
            return outputs
        now = time.monotonic()
        outputs = self._fail_requests(ve, step.failed, now)
        return outputs + self._postprocess(ve, step.scheduler_output, step.runner_output, now)

    def _complete(
        self,
        ve: VirtualEngine,
        batch: SchedulerOutput,
        handle: object,
        snapshot: GeneratorSnapshot | None,
    ) -> IsolatedStep:
        """The batch's output; a batch that raised is re-run in parts to find the culprits."""
        vocab_size = self.model_config.vocab_size
        try:
            if isinstance(handle, BaseException):
                raise handle
            t0 = time.perf_counter()
            output = ModelRunnerOutput([]) if handle is None else self.executor.wait(handle)
            self._execute_s += time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - isolate_failure re-raises fatal ones
            assert snapshot is not None  # taken with every submitted batch

            def run(sub: SchedulerOutput) -> ModelRunnerOutput:
                return self.executor.wait(self.executor.execute_async(sub, ve.block_offset))

            return isolate_failure(run, batch, exc, snapshot, vocab_size)
        return check_sampled(batch, output, vocab_size)

    def _submit_idle(self) -> None:
        """Schedules and submits a batch on every virtual engine without one in flight."""
        now = time.monotonic()
        for ve in self.virtual_engines:
            if ve.busy or not ve.scheduler.has_unfinished_requests():
                continue
            scheduler_output = ve.scheduler.schedule(now)
            handle: object = None
            snapshot = None
            if not scheduler_output.is_empty:
                snapshot = GeneratorSnapshot(scheduler_output.sampling_requests())
                try:
                    t0 = time.perf_counter()
                    handle = self.executor.execute_async(scheduler_output, ve.block_offset)
                    self._execute_s += time.perf_counter() - t0
                except Exception as exc:  # noqa: BLE001 - reported by step() with its batch
                    handle = exc
            ve.busy = True
            self._in_flight.append((ve, scheduler_output, handle, snapshot))

    def _postprocess(
        self,
        ve: VirtualEngine,
        scheduler_output: SchedulerOutput,
        runner_output: ModelRunnerOutput,
        now: float,
    ) -> list[RequestOutput]:
        """Appends the sampled tokens, finishes stopped requests, builds the outputs."""
        finished = list(scheduler_output.finished)  # aborted or rejected by the scheduler
        update = ve.scheduler.update_from_output(
            scheduler_output, runner_output.sampled_token_ids, runner_output.logprobs, now
        )
        finished += update.finished
        streaming = self._streaming
        updated = [
            r for r in update.updated if not r.is_finished and r.request_id in streaming
        ] if streaming else []  # fmt: skip
        # Prefill throughput counts the prompt tokens of the prefills this step finished,
        # their cached prefix included: what the controller counts (it sees whole prefills
        # only) and what vLLM's "prompt throughput" counts. Counting only the computed
        # tokens showed ~1 tok/s of prefill during a benchmark whose prompts hit the cache.
        self._stats.record(
            sum(
                p.prefix_len + p.num_new_tokens
                for p in scheduler_output.prefills
                if p.produces_token
            ),
            scheduler_output.num_decode_tokens,
            len(scheduler_output.preempted),
        )
        outputs = self._outputs(updated, finished)
        if finished:
            self.executor.release_requests([r.seq_id for r in finished])
        self._stats.observe(busy=self.has_unfinished_requests())
        self._stats.maybe_log(self._take_stats)
        return outputs

    def _fail_step(
        self, ve: VirtualEngine, scheduler_output: SchedulerOutput, exc: Exception, now: float
    ) -> list[RequestOutput]:
        """The step's requests finish with finish_reason "error" and their KV is freed (the
        scheduler already counted the step's tokens as computed, so they cannot resume);
        requests outside the step go on. A broken executor fails every later step the same
        way, so nothing waits forever."""
        num = len(scheduler_output.prefills) + len(scheduler_output.decodes)
        logger.exception("engine step failed; failing the %d requests in it", num)
        message = f"engine step failed: {type(exc).__name__}: {exc}"
        finished = list(scheduler_output.finished)
        prefills = scheduler_output.prefills
        step_requests = [p.request for p in prefills]
        # Forked in this step: their KV is the prompt the failed step did not write.
        step_requests += [child for p in prefills for child in p.forks]
        step_requests += scheduler_output.decodes
        for request in step_requests:
            if request.is_finished:  # aborted while its batch was in flight
                continue
            request.error = message
            ve.scheduler.finish_request(request, RequestStatus.FINISHED_ERROR, now)
            finished.append(request)
        outputs = self._outputs([], finished)
        self._stats.observe(busy=self.has_unfinished_requests())  # may have gone idle
        return outputs

    def _fail_requests(
        self, ve: VirtualEngine, failed: list[tuple[Request, str]], now: float
    ) -> list[RequestOutput]:
        """Finishes the requests that failed their step alone (finish_reason "error")."""
        for request, message in failed:
            request.error = message
            ve.scheduler.finish_request(request, RequestStatus.FINISHED_ERROR, now)
        outputs = self._outputs([], [r for r, _ in failed])
        if failed:
            self.executor.release_requests([r.seq_id for r, _ in failed])
        return outputs

    def _stop_checker(self, params: SamplingParams, prompt_token_ids: list[int]) -> StopChecker:
        detokenizer = None
        if self.tokenizer is not None:
            detokenizer = IncrementalDetokenizer(
                self.tokenizer, prompt_token_ids, params.skip_special_tokens
            )
        return StopChecker(
            params,
            eos_token_id=self.model_config.eos_token_id,
            num_prompt_tokens=len(prompt_token_ids),
            max_model_len=self.scheduler_config.max_model_len,
            detokenizer=detokenizer,
        )

    def _outputs(self, updated: list[Request], finished: list[Request]) -> list[RequestOutput]:
        """The outputs of a step: streaming requests that got a token (`updated`, still
        running) and finished ones. A group of sequences gives one output, once per step:
        while streaming, then when its last sequence finishes (and it leaves the tables)."""
        if not self._groups:  # no n > 1 request live: one output per request
            for request in finished:
                self._finalize(request)
            return [
                RequestOutput.from_request(r, tokenizer=self.tokenizer)
                for r in (*updated, *finished)
            ]
        outputs = []
        seen: set[int] = set()
        for request in updated:
            group = self._groups.get(request.request_id)
            if group is None:
                outputs.append(RequestOutput.from_request(request, tokenizer=self.tokenizer))
            elif id(group) not in seen:
                seen.add(id(group))
                outputs.append(group.output(self.tokenizer))
        groups = [self._groups.get(r.request_id) for r in finished]
        for request, group in zip(finished, groups, strict=True):
            if group is None:
                self._finalize(request)
                outputs.append(RequestOutput.from_request(request, tokenizer=self.tokenizer))
            elif group.is_finished and group.request.request_id in self._requests:
                for sequence in group.sequences:
                    self._finalize(sequence)
                    del self._groups[sequence.request_id]
                outputs = [o for o in outputs if o.request_id != group.request.request_id]
                outputs.append(group.output(self.tokenizer))
        return outputs

    def _finalize(self, request: Request) -> None:
        """Drops the request from the engine's tables."""
        self._requests.pop(request.request_id, None)
        self._streaming.discard(request.request_id)

    # ---- stats, health, shutdown ----------------------------------------------------------

    def stats(self) -> EngineStats:
        """The snapshot taken after the last step: a scrape from another thread never walks
        the schedulers while the engine thread changes them."""
        return self._snapshot

    def _take_stats(self) -> EngineStats:
        engines = self.virtual_engines  # PP > 1: one scheduler per virtual engine
        num_running = sum(ve.scheduler.num_running for ve in engines)
        num_waiting = sum(ve.scheduler.num_waiting for ve in engines)
        kv = combined_kv_stats(engines)
        instance = InstanceStats(
            "colocated-0", "colocated", num_running, num_waiting, kv.usage,
            prefix_cache_queries=kv.prefix_cache_queries, prefix_cache_hits=kv.prefix_cache_hits,
        )  # fmt: skip
        return EngineStats([instance])

    def check_health(self) -> None:
        if self._closed:
            raise EngineDeadError("the engine was shut down")

    def shutdown(self) -> None:
        self._closed = True
        self._in_flight.clear()
        self.executor.shutdown()


def make_executor(
    config: EngineConfig, model: CausalLM | None = None, sample: SampleFn | None = None
) -> Executor:
    """The executor `config` asks for: one worker in this process, or TP x PP processes."""
    if config.parallelism.world_size == 1:
        return UniprocExecutor(Worker(config, model=model, sample=sample))
    if model is not None or sample is not None:
        raise ValueError(
            "a prebuilt model or sample function cannot be used with tensor_parallel_size "
            f"{config.tensor_parallel_size} x pipeline_parallel_size "
            f"{config.pipeline_parallel_size}: each worker process loads its own shard"
        )
    return MultiprocExecutor(config)
