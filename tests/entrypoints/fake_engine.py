"""`FakeEngine`: a deterministic `EngineClient` for the server tests.

It generates the letters ``a, b, c, ...`` (byte-tokenizer ids) with a small async sleep per
output, so streams interleave like a real engine's. Markers in the prompt text steer it:

- ``FAIL``  -> after 2 tokens the request finishes with finish_reason "error" (engine-side
  failure reported in the output);
- ``RAISE`` -> after 2 tokens the output iterator raises RuntimeError (engine bug);
- ``EOS``   -> after 3 tokens it emits EOS and finishes with "stop" (unless ignore_eos).

``overloaded`` / ``dead`` make admission raise `EngineOverloadedError` / `EngineDeadError`
(``dead`` also fails `check_health`). It records every request, abort and early close.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from distserve_rt.engine.protocol import (
    EngineDeadError,
    EngineOverloadedError,
    EngineStats,
    InstanceStats,
    PromptType,
    TransferTotals,
)
from distserve_rt.logprobs import Logprob
from distserve_rt.outputs import CompletionOutput, RequestMetrics, RequestOutput
from distserve_rt.sampling_params import SamplingParams
from distserve_rt.tokenizer import ByteTokenizer
from distserve_rt.tokenizer.byte_tokenizer import NUM_SPECIAL_IDS

EOS_ID = 2


def letter_id(i: int) -> int:
    """The id of the i-th generated token: letters a..z cycling."""
    return ord("a") + i % 26 + NUM_SPECIAL_IDS


@dataclass
class SubmittedRequest:
    prompt_token_ids: list[int]
    params: SamplingParams


class FakeEngine:
    def __init__(
        self,
        *,
        model_name: str = "fake-model",
        max_model_len: int = 128,
        token_delay_s: float = 0.001,
        tokens_per_output: int = 1,
    ) -> None:
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.token_delay_s = token_delay_s
        self.tokens_per_output = tokens_per_output
        self._tokenizer = ByteTokenizer(512, bos_token_id=1, eos_token_id=EOS_ID)
        self.overloaded = False
        self.dead = False
        self.requests: dict[str, SubmittedRequest] = {}
        self.aborted: list[str] = []
        self.closed_early: list[str] = []
        self.finished_ids: set[str] = set()
        self.running: set[str] = set()
        self.shutdown_called = False

    @property
    def tokenizer(self) -> ByteTokenizer:
        return self._tokenizer

    async def generate(
        self, prompt: PromptType, sampling_params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        if self.dead:
            raise EngineDeadError("fake engine is dead")
        if self.overloaded:
            raise EngineOverloadedError("fake engine queues are full")
        ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else None
        ids = ids if ids is not None else self._tokenizer.encode(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens >= max_model_len")
        self.requests[request_id] = SubmittedRequest(list(ids), sampling_params)
        self.running.add(request_id)
        text = self._tokenizer.decode(ids)
        arrival = time.monotonic()
        tokens: list[int] = []
        logprobs: list[dict[int, Logprob]] | None = (
            [] if sampling_params.logprobs is not None else None
        )
        try:
            while True:
                await asyncio.sleep(self.token_delay_s)
                if request_id not in self.running:  # aborted
                    yield self._output(request_id, ids, tokens, logprobs, "abort", arrival)
                    return
                for _ in range(self.tokens_per_output):
                    self._append(tokens, logprobs, sampling_params, text)
                reason, error = self._finish_reason(tokens, sampling_params, text)
                if "RAISE" in text and len(tokens) >= 2:
                    raise RuntimeError("fake engine crash")
                out = self._output(request_id, ids, tokens, logprobs, reason, arrival, error)
                if reason is not None:
                    self.finished_ids.add(request_id)
                    self.running.discard(request_id)
                yield out
                if reason is not None:
                    return
        finally:
            if request_id in self.running:
                self.closed_early.append(request_id)
                self.running.discard(request_id)

    def _append(self, tokens, logprobs, params: SamplingParams, text: str) -> None:
        eos = "EOS" in text and len(tokens) == 2 and not params.ignore_eos
        token = EOS_ID if eos else letter_id(len(tokens))
        tokens.append(token)
        if logprobs is not None:
            row = {token: Logprob(-0.1, 1)}
            for j in range(params.logprobs):
                row.setdefault(letter_id(len(tokens) + j + 5), Logprob(-1.0 - j, j + 2))
            logprobs.append(row)

    def _finish_reason(self, tokens, params: SamplingParams, text: str):
        if "FAIL" in text and len(tokens) >= 2:
            return "error", "fake generation failure"
        if tokens and tokens[-1] == EOS_ID:
            return "stop", None
        if params.max_tokens is not None and len(tokens) >= params.max_tokens:
            return "length", None
        return None, None

    def _output(self, request_id, ids, tokens, logprobs, reason, arrival, error=None):
        now = time.monotonic()
        metrics = RequestMetrics(
            arrival_time=arrival,
            first_scheduled_time=arrival,
            first_token_time=now,
            last_token_time=now,
            finished_time=now if reason else None,
            time_in_queue=0.0,
            ttft=None,
            tpot=None,
            e2e_latency=None,
        )
        completion = CompletionOutput(
            index=0,
            text=self._tokenizer.decode(tokens),
            token_ids=list(tokens),
            finish_reason=reason,
            logprobs=None if logprobs is None else list(logprobs),
        )
        return RequestOutput(
            request_id, None, list(ids), [completion], reason is not None, metrics, error
        )

    async def abort(self, request_id: str) -> None:
        # Recorded even when the iterator was already closed (a cancelled read closes it
        # first): the server must still call abort, which is what the tests check.
        unfinished = request_id in self.requests and request_id not in self.finished_ids
        if unfinished and request_id not in self.aborted:
            self.aborted.append(request_id)
        self.running.discard(request_id)

    def stats(self) -> EngineStats:
        num_running = len(self.running)
        return EngineStats(
            instances=[
                InstanceStats("prefill-0", "prefill", 0, num_running, 0.125),
                InstanceStats("decode-0", "decode", num_running, 0, 0.25),
            ],
            transfers=TransferTotals(
                "fake", len(self.finished_ids), 1, 4096 * len(self.finished_ids), 0.5
            ),
        )

    async def check_health(self) -> None:
        if self.dead:
            raise EngineDeadError("fake engine is dead")

    def shutdown(self) -> None:
        self.shutdown_called = True
