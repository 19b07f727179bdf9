"""What `LLM.generate` and `LLMEngine.step` return, shaped like vLLM's outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distserve_rt.core.request import Request, mean_tpot
from distserve_rt.core.stop_checker import FinishReason
from distserve_rt.logprobs import SampleLogprobs, fill_decoded_tokens


@dataclass(slots=True)
class CompletionOutput:
    """One completion of a request: index 0..n-1 (``n == 1``: always 0)."""

    index: int
    text: str
    """Detokenized output ('' when the engine runs without a tokenizer)."""
    token_ids: list[int]
    finish_reason: FinishReason | None
    """STOP, LENGTH, ABORT or ERROR (a `str`: "stop", "length", ...), None while running."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended it (None for EOS and length)."""
    logprobs: SampleLogprobs | None = None
    """Per output token: {token id: `Logprob`} (logprob, rank, decoded_token) of the sampled
    token and the top SamplingParams.logprobs tokens, as vLLM's; None when not asked."""
    cumulative_logprob: float | None = None
    """Sum of the sampled tokens' logprobs (what best_of ranks by); None when no logprob
    was drawn (neither logprobs nor best_of > n asked)."""

    @classmethod
    def from_request(
        cls,
        request: Request,
        index: int = 0,
        keep_logprobs: bool = True,
        tokenizer: Any = None,
    ) -> CompletionOutput:
        """The request's completion so far, as completion `index`; `keep_logprobs` False
        drops logprobs drawn only for the cumulative one (best_of's ranking); `tokenizer`
        (the engine's, or None) fills the logprobs' decoded_token."""
        logprobs = None if request.logprobs is None else list(request.logprobs)
        cumulative = None
        if logprobs is not None:
            pairs = zip(request.output_token_ids, logprobs, strict=False)
            cumulative = sum(row[token].logprob for token, row in pairs)
            if keep_logprobs:
                fill_decoded_tokens(logprobs, tokenizer)
        return cls(
            index=index,
            text=request.output_text,
            token_ids=request.output_token_ids,
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
            logprobs=logprobs if keep_logprobs else None,
            cumulative_logprob=cumulative,
        )


@dataclass(slots=True)
class LatencyBreakdown:
    """Where a disaggregated request's time went (seconds; the paper's Figure 10). A phase
    that did not happen (the request stopped at its first token, failed) is None."""

    prefill_queue: float | None = None
    """arrival -> its prefill batch starts."""
    prefill: float | None = None
    """The prefill step that produced its first token."""
    transfer_queue: float | None = None
    """First token -> the decode instance starts pulling the KV (waits for room)."""
    transfer: float | None = None
    """The KV pull, submit -> done."""
    decode_queue: float | None = None
    """KV landed -> its first decode step starts."""
    decode: float | None = None
    """First decode step -> finished."""
    transfer_bytes: int | None = None


@dataclass(slots=True)
class RequestMetrics:
    """Lifecycle times (``time.monotonic()`` seconds) and the latencies derived from them."""

    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    last_token_time: float | None
    finished_time: float | None
    time_in_queue: float | None
    """first_scheduled - arrival."""
    ttft: float | None
    """Time to first token: first_token - arrival."""
    tpot: float | None
    """Mean time per output token after the first (None with fewer than 2 tokens)."""
    e2e_latency: float | None
    num_preemptions: int = 0
    breakdown: LatencyBreakdown | None = None
    """Disaggregated placements only (None when colocated)."""

    @classmethod
    def from_times(
        cls,
        arrival_time: float,
        first_scheduled_time: float | None,
        token_times: list[float],
        finished_time: float | None,
        num_preemptions: int = 0,
        breakdown: LatencyBreakdown | None = None,
    ) -> RequestMetrics:
        """The one place the latencies are derived, for every engine's requests."""

        def since_arrival(t: float | None) -> float | None:
            return None if t is None else t - arrival_time

        first = token_times[0] if token_times else None
        return cls(
            arrival_time=arrival_time,
            first_scheduled_time=first_scheduled_time,
            first_token_time=first,
            last_token_time=token_times[-1] if token_times else None,
            finished_time=finished_time,
            time_in_queue=since_arrival(first_scheduled_time),
            ttft=since_arrival(first),
            tpot=mean_tpot(token_times),
            e2e_latency=since_arrival(finished_time),
            num_preemptions=num_preemptions,
            breakdown=breakdown,
        )

    @classmethod
    def from_request(cls, request: Request) -> RequestMetrics:
        return cls.from_times(
            request.arrival_time, request.first_scheduled_time, request.token_times,
            request.finished_time, request.num_preemptions,
        )  # fmt: skip


@dataclass(slots=True)
class RequestOutput:
    """The state of one request: its prompt, its completion so far, and its timings."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None
    """Why the request failed (finish_reason "error")."""

    @classmethod
    def from_request(
        cls, request: Request, metrics: RequestMetrics | None = None, tokenizer: Any = None
    ) -> RequestOutput:
        """`metrics`: the disaggregated controller's (with its latency breakdown);
        `tokenizer`: the engine's (decodes the logprobs' tokens), or None."""
        completion = CompletionOutput.from_request(request, tokenizer=tokenizer)
        return cls(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=[completion],
            finished=request.is_finished,
            metrics=metrics or RequestMetrics.from_request(request),
            error=request.error,
        )
