"""`LLMEngine`: one colocated instance (prefill and decode on the same devices).

A step is small methods in sequence::

    schedule (policy, KV blocks)  ->  execute (prepare inputs -> model -> sample)
                                  ->  postprocess (append tokens, stops, free, outputs)

Not thread-safe: one caller drives `step` (the async front end runs it in one loop).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

from distserve_rt.core.block_manager import BlockManager
from distserve_rt.core.request import Request, RequestStatus
from distserve_rt.core.scheduler import Scheduler, SchedulerOutput, make_scheduler
from distserve_rt.engine.config import EngineConfig
from distserve_rt.engine.stats import StatsLogger
from distserve_rt.logger import init_logger
from distserve_rt.models.interface import CausalLM
from distserve_rt.outputs import RequestOutput
from distserve_rt.sampling_params import SamplingParams
from distserve_rt.worker.executor import Executor, UniprocExecutor
from distserve_rt.worker.model_runner import ModelRunnerOutput, SampleFn
from distserve_rt.worker.worker import Worker

logger = init_logger(__name__)


class LLMEngine:
    """Colocated engine: requests in, `RequestOutput`s out, one `step` at a time.

    Args:
        config: the engine configuration.
        model: a prebuilt model (tests); `config.model` is loaded when None.
        sample: the sampling function of the runner (greedy by default).
        executor: a prebuilt executor (benchmarks pass one without a model); built from
            `config` (a `UniprocExecutor`) when None.
        tokenizer: decodes output text at finish; None keeps token ids only (text '').
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
        self.executor = executor or UniprocExecutor(Worker(config, model=model, sample=sample))
        self.model_config = self.executor.model_config
        self.scheduler_config = config.scheduler_config(self.model_config.max_position_embeddings)
        num_blocks = self.executor.init_kv_cache(self.scheduler_config)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.watermark)
        self.scheduler: Scheduler = make_scheduler(
            config.policy, self.scheduler_config, self.block_manager
        )
        self.tokenizer = tokenizer
        self._requests: dict[str, Request] = {}
        self._streaming: set[str] = set()
        self._seq_ids = itertools.count()
        self._stats = StatsLogger(logger, config.log_stats_interval_s, time.monotonic())

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
        raise ValueError."""
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = sampling_params or SamplingParams()
        if params.stop:
            raise NotImplementedError(
                "stop strings need the incremental detokenizer (distserve_rt.core."
                "stop_checker), which is not merged yet"
            )
        token_ids = self._check_token_ids(request_id, prompt_token_ids)
        request = Request(
            request_id,
            next(self._seq_ids),
            token_ids,
            params,
            time.monotonic() if arrival_time is None else arrival_time,
            self.scheduler_config.max_model_len,
            prompt=prompt,
        )
        self._requests[request_id] = request
        if stream:
            self._streaming.add(request_id)
        self.scheduler.add_request(request)
        return request

    def abort_request(self, request_id: str) -> bool:
        """Aborts a live request (finish_reason "abort", reported by the next `step`);
        False when it is unknown or already finished."""
        return self.scheduler.abort_request(request_id, time.monotonic()) is not None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._requests)

    # ---- the step -----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one step; returns the outputs of finished (and streaming) requests."""
        scheduler_output = self.scheduler.schedule(time.monotonic())
        runner_output = self._execute(scheduler_output)
        return self._postprocess(scheduler_output, runner_output, time.monotonic())

    def _execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        if scheduler_output.is_empty:
            return ModelRunnerOutput(sampled_token_ids=[])
        return self.executor.execute(scheduler_output)

    def _postprocess(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput, now: float
    ) -> list[RequestOutput]:
        """Appends the sampled tokens, finishes stopped requests, builds the outputs."""
        finished = list(scheduler_output.finished)  # aborted or rejected by the scheduler
        streaming = self._streaming
        updated: list[Request] = []
        requests = scheduler_output.sampling_requests()
        for request, token_id in zip(requests, runner_output.sampled_token_ids, strict=True):
            request.append_token(token_id, now)
            status = self._check_stop(request, token_id)
            if status is not None:
                self.scheduler.finish_request(request, status, now)
                finished.append(request)
            elif streaming and request.request_id in streaming:
                updated.append(request)
        self._stats.record_step(
            scheduler_output.num_prefill_tokens, len(requests), len(scheduler_output.preempted)
        )
        self._maybe_log_stats(now)
        outputs = [RequestOutput.from_request(r) for r in updated]
        for request in finished:
            self._finalize(request)
            outputs.append(RequestOutput.from_request(request))
        return outputs

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        """EOS and stop token ids (after min_tokens), then the length limits."""
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
            if token_id == self.model_config.eos_token_id and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
        if request.num_tokens >= request.max_num_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finalize(self, request: Request) -> None:
        """Drops the request from the engine and decodes its text (once, at the end)."""
        self._requests.pop(request.request_id, None)
        self._streaming.discard(request.request_id)
        if self.tokenizer is None or not request.num_output_tokens:
            return
        token_ids = request.output_token_ids
        stopped_by_token = (
            request.status is RequestStatus.FINISHED_STOPPED
            and not request.sampling_params.include_stop_str_in_output
        )
        if stopped_by_token:
            token_ids = token_ids[:-1]  # the stop token's text is not part of the output
        request.output_text = self.tokenizer.decode(
            token_ids, skip_special_tokens=request.sampling_params.skip_special_tokens
        )

    def _maybe_log_stats(self, now: float) -> None:
        scheduler = self.scheduler
        self._stats.maybe_log(
            now, scheduler.num_running, scheduler.num_waiting, self.block_manager.stats()
        )

    def _check_token_ids(self, request_id: str, token_ids: Sequence[int]) -> list[int]:
        vocab_size = self.model_config.vocab_size
        ids = list(token_ids)
        if not ids:
            raise ValueError(f"request {request_id!r}: prompt_token_ids must not be empty")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                raise ValueError(
                    f"request {request_id!r}: prompt_token_ids must be ints in "
                    f"[0, {vocab_size}), got {t!r}"
                )
        return ids

    def shutdown(self) -> None:
        self.executor.shutdown()
