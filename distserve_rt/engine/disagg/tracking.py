"""The controller's view of one request: the shared `Request` record, which phase it is in,
on which instances, and the disaggregated timings its `RequestOutput` reports."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from distserve_rt.core.request import Request, RequestStatus
from distserve_rt.core.stop_checker import FinishReason, StopCheckResult
from distserve_rt.logprobs import Logprob
from distserve_rt.outputs import LatencyBreakdown, RequestMetrics, RequestOutput


class Phase(enum.Enum):
    PREFILLING = "prefilling"
    """Sent to a prefill instance; no token yet (or re-prefilled after a failure)."""
    MIGRATING = "migrating"
    """First token out; its KV moves to a decode instance (`Controller.migrations` holds
    the migration's own state)."""
    DECODING = "decoding"
    """KV pulled; decoding on its decode instance."""
    FINISHED = "finished"


def _diff(end: float | None, start: float | None) -> float | None:
    return None if end is None or start is None else end - start


@dataclass(slots=True)
class TrackedRequest:
    """The controller's record of a request: the shared `Request` (tokens, text, stop
    checker, logprobs, timeline, finish; the record every engine uses) plus what only the
    controller knows: where the request runs and the disaggregated timings."""

    request: Request
    stream: bool
    phase: Phase = Phase.PREFILLING
    prefill_index: int | None = None
    decode_index: int | None = None
    num_queued_tokens: int = 0
    """Tokens it adds to its prefill instance's queue (the dispatch load measure)."""
    num_retries: int = 0
    prefill_start_time: float | None = None
    prefill_end_time: float | None = None
    pull_start_time: float | None = None
    pull_end_time: float | None = None
    first_decode_time: float | None = None
    transfer_bytes: int | None = None
    generator_state: bytes | None = None
    """Seeded requests: the sampler's generator state after the last token (migrated)."""

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def token_ids(self) -> list[int]:
        """Prompt + generated tokens (what a retry prefills)."""
        return self.request.token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return self.request.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.request.output_token_ids

    def append_tokens(
        self,
        token_ids: list[int],
        now: float,
        logprobs: list[dict[int, Logprob]] | None = None,
    ) -> StopCheckResult | None:
        """Appends tokens in order until the stop checker ends the request (the tokens an
        instance computed after that are dropped, as the colocated engine never makes them).
        Returns the checker's result that ended it, None while it runs (or no checker)."""
        request = self.request
        for i, token_id in enumerate(token_ids):
            request.append_token(token_id, now)
            if request.logprobs is not None and logprobs is not None:
                request.logprobs.append(logprobs[i])
            if request.stop_checker is None:
                continue
            result = request.stop_checker.append(token_id)
            request.output_text += result.text_delta
            if result.finish_reason is not None:
                return result
        return None

    def finish(
        self, reason: FinishReason, stop_reason: int | str | None, error: str | None, now: float
    ) -> None:
        self.phase = Phase.FINISHED
        self.request.stop_reason = stop_reason
        self.request.finish(RequestStatus.finished(reason), now, error)

    def breakdown(self) -> LatencyBreakdown:
        return LatencyBreakdown(
            prefill_queue=_diff(self.prefill_start_time, self.request.arrival_time),
            prefill=_diff(self.prefill_end_time, self.prefill_start_time),
            transfer_queue=_diff(self.pull_start_time, self.prefill_end_time),
            transfer=_diff(self.pull_end_time, self.pull_start_time),
            decode_queue=_diff(self.first_decode_time, self.pull_end_time),
            decode=_diff(self.request.finished_time, self.first_decode_time),
            transfer_bytes=self.transfer_bytes,
        )

    def metrics(self) -> RequestMetrics:
        r = self.request
        return RequestMetrics.from_times(
            r.arrival_time, self.prefill_start_time, r.token_times, r.finished_time,
            breakdown=self.breakdown(),
        )  # fmt: skip

    def to_output(self, tokenizer: Any = None) -> RequestOutput:
        """`tokenizer`: the controller's (decodes the logprobs' tokens), or None."""
        return RequestOutput.from_request(self.request, self.metrics(), tokenizer)
