"""`FakeEngine`: a deterministic `EngineClient` for the serving benchmark's tests.

Each request waits ``ttft_s``, yields its first token, then one token per ``per_token_s``
until ``max_tokens``; cumulative outputs, as `AsyncLLM` yields them. Request ids in
``fail_ids`` end with finish_reason "error", in ``reject_ids`` raise
`EngineOverloadedError` at submission, in ``hang_ids`` never produce a token. With
``max_num_running``, at most that many run at once and the rest queue (a server with a
capacity). Closing a stream early records the id in ``aborted`` (the EngineClient
contract: that aborts it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from distserve_rt.engine.protocol import EngineOverloadedError, EngineStats
from distserve_rt.outputs import CompletionOutput, RequestMetrics, RequestOutput
from distserve_rt.sampling_params import SamplingParams
from distserve_rt.tokenizer import ByteTokenizer


class FakeEngine:
    model_name = "fake-model"

    def __init__(
        self,
        *,
        ttft_s: float = 0.004,
        per_token_s: float = 0.001,
        max_model_len: int = 256,
        fail_ids: frozenset[str] = frozenset(),
        reject_ids: frozenset[str] = frozenset(),
        hang_ids: frozenset[str] = frozenset(),
        max_num_running: int | None = None,
    ) -> None:
        self.ttft_s, self.per_token_s = ttft_s, per_token_s
        self.max_model_len = max_model_len
        self.fail_ids, self.reject_ids, self.hang_ids = fail_ids, reject_ids, hang_ids
        self.max_num_running = max_num_running
        self._slots: asyncio.Semaphore | None = None  # made on the running loop
        self._tokenizer = ByteTokenizer(512, 1, 2)
        self.received: list[tuple[str, list[int], SamplingParams]] = []
        self.aborted: list[str] = []

    @property
    def tokenizer(self) -> ByteTokenizer:
        return self._tokenizer

    def generate(
        self, prompt, sampling_params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        if request_id in self.reject_ids:
            raise EngineOverloadedError("queues full")
        ids = list(prompt["prompt_token_ids"])
        if len(ids) + (sampling_params.max_tokens or 0) > self.max_model_len:
            raise ValueError(f"request {request_id} exceeds max_model_len {self.max_model_len}")
        self.received.append((request_id, ids, sampling_params))
        return self._stream(request_id, ids, sampling_params)

    async def _stream(self, request_id, ids, params) -> AsyncIterator[RequestOutput]:
        if self.max_num_running is None:
            async for output in self._run(request_id, ids, params, time.monotonic()):
                yield output
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_num_running)
        arrival = time.monotonic()
        async with self._slots:  # queueing: TTFT grows with load past capacity
            async for output in self._run(request_id, ids, params, arrival):
                yield output

    async def _run(self, request_id, ids, params, arrival) -> AsyncIterator[RequestOutput]:
        tokens: list[int] = []
        finished = False
        try:
            await asyncio.sleep(self.ttft_s)
            if request_id in self.hang_ids:
                await asyncio.sleep(3600)
            while len(tokens) < params.max_tokens:
                if tokens:
                    await asyncio.sleep(self.per_token_s)
                tokens.append(3 + (len(ids) + len(tokens)) % 256)
                failed = request_id in self.fail_ids and len(tokens) == 2
                finished = failed or len(tokens) == params.max_tokens
                yield self._output(request_id, ids, tokens, arrival, finished, failed)
                if failed:
                    return
        finally:
            if not finished:
                self.aborted.append(request_id)

    def _output(self, request_id, ids, tokens, arrival, finished, failed) -> RequestOutput:
        now = time.monotonic()
        reason = ("error" if failed else "length") if finished else None
        metrics = RequestMetrics(
            arrival_time=arrival,
            first_scheduled_time=arrival,
            first_token_time=arrival + self.ttft_s,
            last_token_time=now,
            finished_time=now if finished else None,
            time_in_queue=0.0,
            ttft=self.ttft_s,
            tpot=self.per_token_s if len(tokens) > 1 else None,
            e2e_latency=(now - arrival) if finished else None,
        )
        return RequestOutput(
            request_id=request_id,
            prompt=None,
            prompt_token_ids=ids,
            outputs=[CompletionOutput(0, self._tokenizer.decode(tokens), list(tokens), reason)],
            finished=finished,
            metrics=metrics,
            error="fake failure" if failed else None,
        )

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def stats(self) -> EngineStats:
        return EngineStats()

    async def check_health(self) -> None:
        return None
