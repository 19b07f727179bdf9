"""The controller's view of one request: which phase it is in, on which instances, its
tokens and timestamps, and the `RequestOutput` built from them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from distserve_rt.core.stop_checker import StopChecker, StopCheckResult
from distserve_rt.outputs import CompletionOutput, LatencyBreakdown, RequestMetrics, RequestOutput
from distserve_rt.sampling_params import SamplingParams


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
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    stream: bool
    phase: Phase = Phase.PREFILLING
    prefill_index: int | None = None
    decode_index: int | None = None
    num_queued_tokens: int = 0
    """Tokens it adds to its prefill instance's queue (the dispatch load measure)."""
    num_retries: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    prefill_start_time: float | None = None
    prefill_end_time: float | None = None
    pull_start_time: float | None = None
    pull_end_time: float | None = None
    first_decode_time: float | None = None
    finished_time: float | None = None
    transfer_bytes: int | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    text: str = ""
    """The text streamed so far (the final text once finished), from `stop_checker`."""
    stop_checker: StopChecker | None = None
    """Detokenizes and applies the stop rules (None without a tokenizer: no text)."""
    logprobs: list[dict[int, float]] | None = None
    """Per output token (when SamplingParams.logprobs is set): {token id: logprob}."""
    generator_state: bytes | None = None
    """Seeded requests: the sampler's generator state after the last token (migrated)."""

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def append_tokens(
        self,
        token_ids: list[int],
        now: float,
        logprobs: list[dict[int, float]] | None = None,
    ) -> StopCheckResult | None:
        """Appends tokens in order until the stop checker ends the request (the tokens an
        instance computed after that are dropped, as the colocated engine never makes them).
        Returns the checker's result that ended it, None while it runs (or no checker)."""
        for i, token_id in enumerate(token_ids):
            self.output_token_ids.append(token_id)
            self.token_times.append(now)
            if self.logprobs is not None and logprobs is not None:
                self.logprobs.append(logprobs[i])
            if self.stop_checker is None:
                continue
            result = self.stop_checker.append(token_id)
            self.text += result.text_delta
            if result.finish_reason is not None:
                return result
        return None

    def breakdown(self) -> LatencyBreakdown:
        return LatencyBreakdown(
            prefill_queue=_diff(self.prefill_start_time, self.arrival_time),
            prefill=_diff(self.prefill_end_time, self.prefill_start_time),
            transfer_queue=_diff(self.pull_start_time, self.prefill_end_time),
            transfer=_diff(self.pull_end_time, self.pull_start_time),
            decode_queue=_diff(self.first_decode_time, self.pull_end_time),
            decode=_diff(self.finished_time, self.first_decode_time),
            transfer_bytes=self.transfer_bytes,
        )

    def metrics(self) -> RequestMetrics:
        times = self.token_times
        first = times[0] if times else None
        tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
        return RequestMetrics(
            arrival_time=self.arrival_time,
            first_scheduled_time=self.prefill_start_time,
            first_token_time=first,
            last_token_time=times[-1] if times else None,
            finished_time=self.finished_time,
            time_in_queue=_diff(self.prefill_start_time, self.arrival_time),
            ttft=_diff(first, self.arrival_time),
            tpot=tpot,
            e2e_latency=_diff(self.finished_time, self.arrival_time),
            breakdown=self.breakdown(),
        )

    def to_output(self) -> RequestOutput:
        completion = CompletionOutput(
            index=0,
            text=self.text,
            token_ids=list(self.output_token_ids),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=None if self.logprobs is None else list(self.logprobs),
        )
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=list(self.prompt_token_ids),
            outputs=[completion],
            finished=self.phase is Phase.FINISHED,
            metrics=self.metrics(),
            error=self.error,
        )
