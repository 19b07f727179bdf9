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
from distserve_rt.core.detokenizer import IncrementalDetokenizer
from distserve_rt.core.request import Request, RequestStatus
from distserve_rt.core.scheduler import Scheduler, SchedulerOutput, make_scheduler
from distserve_rt.core.stop_checker import FinishReason, StopChecker
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

_STATUS = {
    FinishReason.STOP: RequestStatus.FINISHED_STOPPED,
    FinishReason.LENGTH: RequestStatus.FINISHED_LENGTH,
}


class LLMEngine:
    """Colocated engine: requests in, `RequestOutput`s out, one `step` at a time.

    Args:
        config: the engine configuration.
        model: a prebuilt model (tests); `config.model` is loaded when None.
        sample: the sampling function of the runner (greedy by default).
        executor: a prebuilt executor (benchmarks pass one without a model); built from
            `config` (a `UniprocExecutor`) when None.
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
        token_ids = self._check_token_ids(request_id, prompt_token_ids)
        max_model_len = self.scheduler_config.max_model_len
        # Raises ValueError for stop strings without a tokenizer, before anything is queued.
        checker = None if len(token_ids) >= max_model_len else self._stop_checker(params, token_ids)
        request = Request(
            request_id,
            next(self._seq_ids),
            token_ids,
            params,
            time.monotonic() if arrival_time is None else arrival_time,
            max_model_len,
            prompt=prompt,
        )
        # No checker: the prompt leaves no room in the context and the scheduler rejects it.
        request.stop_checker = checker
        if params.logprobs is not None:
            request.logprobs = []
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
            result = request.stop_checker.append(token_id)
            if result.text_delta:
                request.output_text += result.text_delta
            if result.finish_reason is not None:
                request.stop_reason = result.stop_reason
                self.scheduler.finish_request(request, _STATUS[result.finish_reason], now)
                finished.append(request)
            elif streaming and request.request_id in streaming:
                updated.append(request)
        if runner_output.logprobs is not None:
            for request, row in zip(requests, runner_output.logprobs, strict=True):
                if request.logprobs is not None:
                    request.logprobs.append(row)
        self._stats.record_step(
            scheduler_output.num_prefill_tokens, len(requests), len(scheduler_output.preempted)
        )
        self._maybe_log_stats(now)
        outputs = [RequestOutput.from_request(r) for r in updated]
        for request in finished:
            self._finalize(request)
            outputs.append(RequestOutput.from_request(request))
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

    def _finalize(self, request: Request) -> None:
        """Drops the request from the engine's tables."""
        self._requests.pop(request.request_id, None)
        self._streaming.discard(request.request_id)

    def _maybe_log_stats(self, now: float) -> None:
        if self._stats.due(now):
            scheduler = self.scheduler
            self._stats.log(
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
