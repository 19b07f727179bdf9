"""What completions and chat completions share: checking a request against the served
model, turning it into `SamplingParams`, admitting it, and consuming the engine's outputs
with metrics, error mapping and abort on client disconnect.

Admission happens before any byte of the response is sent: the handler waits for the
engine's first output, so an invalid (400) or refused (503) request gets a proper status
even when it asked to stream. After that, a failure mid-way is a 500 for a non-streaming
request and an SSE error event for a streaming one.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http import HTTPStatus

import anyio
from fastapi import Request

from distserve_rt.engine.protocol import EngineClient, EngineDeadError, EngineOverloadedError
from distserve_rt.entrypoints.openai.errors import OpenAIError, bad_request
from distserve_rt.entrypoints.openai.protocol import MAX_LOGPROBS, GenerationRequest
from distserve_rt.logger import init_logger
from distserve_rt.metrics.prometheus import PrometheusMetrics, RequestTracker
from distserve_rt.outputs import RequestOutput
from distserve_rt.sampling_params import SamplingParams

logger = init_logger(__name__)


class ConcurrencyLimiter:
    """At most `max_concurrent` generation requests at once; the next one gets a 429
    (no queueing in the server: the engine's own queues are where requests wait)."""

    def __init__(self, max_concurrent: int | None) -> None:
        if max_concurrent is not None and (
            isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int)
        ):
            raise ValueError(f"max_concurrent must be None or an int >= 1, got {max_concurrent!r}")
        if max_concurrent is not None and max_concurrent < 1:
            raise ValueError(f"max_concurrent must be None or an int >= 1, got {max_concurrent}")
        self.max_concurrent = max_concurrent
        self.num_active = 0

    def acquire(self) -> None:
        if self.max_concurrent is not None and self.num_active >= self.max_concurrent:
            raise OpenAIError(
                HTTPStatus.TOO_MANY_REQUESTS,
                f"the server is serving its maximum of {self.max_concurrent} concurrent "
                "requests (--max-concurrent-requests); retry later",
            )
        self.num_active += 1

    def release(self) -> None:
        self.num_active -= 1


@dataclass
class ServingContext:
    """The engine and the server-wide state every handler uses."""

    engine: EngineClient
    model_name: str
    metrics: PrometheusMetrics
    limiter: ConcurrencyLimiter

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise OpenAIError(
                HTTPStatus.NOT_FOUND,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                "model",
            )

    def check_prompt_ids(self, prompt_ids: list[int], param: str, name: str | None = None) -> None:
        """`name`: what the message calls the prompt (``prompt[2]`` in a batch), `param`
        by default."""
        vocab_size = self.engine.tokenizer.vocab_size
        name = name or param
        if not prompt_ids:
            raise bad_request(f"{name} is empty (0 tokens)", param)
        for i, token in enumerate(prompt_ids):
            if not 0 <= token < vocab_size:
                raise bad_request(
                    f"{name}[{i}] = {token} is not a token id in [0, {vocab_size})", param
                )


def sampling_params(
    ctx: ServingContext,
    request: GenerationRequest,
    *,
    num_prompt_tokens: int,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_param: str,
) -> SamplingParams:
    """Checks unsupported fields and the context length, then builds `SamplingParams`
    (whose ValueError becomes a 400 naming the field)."""
    unsupported = request.unsupported_values()
    if unsupported:
        name, value, allowed = unsupported[0]
        raise bad_request(f"{name}={value!r} is not supported; allowed: {allowed}", name)
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options")
    if request.stream and request.best_of is not None and request.best_of > request.n:
        # The best n are known only when all best_of sequences end (vLLM refuses it too).
        raise bad_request(
            f"best_of={request.best_of} > n={request.n} cannot stream: the best sequences "
            "are known only at the end; use stream=false or best_of <= n",
            "best_of",
        )
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise bad_request(f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}", "logprobs")
    check_context_length(ctx.engine.max_model_len, num_prompt_tokens, max_tokens, prompt_param)
    max_len = ctx.engine.max_model_len
    kwargs = dict(
        max_tokens=max_tokens if max_tokens is not None else max_len - num_prompt_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        min_p=request.min_p,
        seed=request.seed,
        stop=request.stop,
        stop_token_ids=request.stop_token_ids,
        ignore_eos=request.ignore_eos,
        min_tokens=request.min_tokens,
        include_stop_str_in_output=request.include_stop_str_in_output,
        skip_special_tokens=request.skip_special_tokens,
        logprobs=logprobs,
        n=request.n,
        best_of=request.best_of,
    )
    # None means "the default" in the API; SamplingParams has its own defaults for those.
    kwargs = {
        k: v for k, v in kwargs.items() if v is not None or k in ("seed", "logprobs", "best_of")
    }
    try:
        return SamplingParams(**kwargs)
    except (ValueError, NotImplementedError) as exc:
        match = re.match(r"\w+", str(exc))
        param = match.group(0) if match and match.group(0) in kwargs else None
        raise bad_request(str(exc), param) from exc


def check_context_length(
    max_len: int, num_prompt_tokens: int, max_tokens: int | None, prompt_param: str
) -> None:
    """The prompt, plus max_tokens when given, must fit in max_model_len (400 otherwise)."""
    if num_prompt_tokens >= max_len:
        raise bad_request(
            f"the prompt has {num_prompt_tokens} tokens but max_model_len is {max_len}: "
            f"at most {max_len - 1} prompt tokens leave room for one output token",
            prompt_param,
        )
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_len:
        raise bad_request(
            f"max_model_len is {max_len} tokens, but {num_prompt_tokens} prompt tokens + "
            f"max_tokens {max_tokens} = {num_prompt_tokens + max_tokens}; lower max_tokens "
            f"to at most {max_len - num_prompt_tokens}",
            "max_tokens",
        )


async def start_generation(
    ctx: ServingContext,
    request_id: str,
    prompt_ids: list[int],
    params: SamplingParams,
    raw_request: Request,
) -> Generation:
    """Submits the request and waits for its first output (admission; see the module
    docstring). Raises `OpenAIError` with 400, 429, 500 or 503."""
    try:
        ctx.limiter.acquire()
    except OpenAIError:
        ctx.metrics.rejected.labels(status="429").inc()
        raise
    tracker = ctx.metrics.track()
    ctx.metrics.in_flight.inc()
    generation = Generation(ctx, request_id, len(prompt_ids), tracker, raw_request)
    try:
        iterator = ctx.engine.generate({"prompt_token_ids": prompt_ids}, params, request_id)
        generation.iterator = iterator
        generation.first = await anext(iterator)
    except BaseException as exc:
        error = _admission_error(exc)
        # A refused request never entered the engine; anything else (a cancelled wait for
        # the first token, an unexpected error) may still be running there.
        refused = error is not None and error.status != HTTPStatus.INTERNAL_SERVER_ERROR
        await generation.close(abort=not refused)
        if error is None:
            raise
        ctx.metrics.rejected.labels(status=str(int(error.status))).inc()
        raise error from exc
    return generation


def _admission_error(exc: BaseException) -> OpenAIError | None:
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    if isinstance(exc, EngineOverloadedError):
        return OpenAIError(HTTPStatus.SERVICE_UNAVAILABLE, f"engine overloaded: {exc}")
    if isinstance(exc, EngineDeadError):
        return OpenAIError(HTTPStatus.SERVICE_UNAVAILABLE, f"engine is dead: {exc}")
    if isinstance(exc, StopAsyncIteration):
        return OpenAIError(
            HTTPStatus.INTERNAL_SERVER_ERROR, "the engine ended the request without output"
        )
    if isinstance(exc, Exception):
        logger.exception("request admission failed")
        return OpenAIError(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}")
    return None  # cancellation and the like pass through


class Generation:
    """One admitted engine request, consumed by exactly one handler, then `close`d."""

    def __init__(
        self,
        ctx: ServingContext,
        request_id: str,
        num_prompt_tokens: int,
        tracker: RequestTracker,
        raw_request: Request,
    ) -> None:
        self.ctx = ctx
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.tracker = tracker
        self.raw_request = raw_request
        self.iterator: AsyncIterator[RequestOutput] | None = None
        self.first: RequestOutput | None = None
        self._finished = False
        self._closed = False

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """The cumulative outputs, the first included; the last one is finished.

        Raises `OpenAIError` (500, or 503 for a dead engine) when the request fails."""
        output = self.first
        while True:
            self.tracker.observe(sum(len(c.token_ids) for c in output.outputs))
            if output.finished:
                self._finish(output)
                yield output
                return
            yield output
            try:
                output = await anext(self.iterator)
            except Exception as exc:
                raise self._fail(exc) from exc

    def _finish(self, output: RequestOutput) -> None:
        self._finished = True
        self.num_prompt_tokens = len(output.prompt_token_ids) or self.num_prompt_tokens
        reason = output.outputs[0].finish_reason or "stop"
        queue_time = output.metrics.time_in_queue if output.metrics else None
        self.tracker.finish(reason, self.num_prompt_tokens, queue_time)
        if reason == "error":
            message = output.error or "generation failed (no reason given by the engine)"
            raise OpenAIError(HTTPStatus.INTERNAL_SERVER_ERROR, message)

    def _fail(self, exc: Exception) -> OpenAIError:
        self._finished = True
        self.tracker.finish("error", self.num_prompt_tokens)
        if isinstance(exc, StopAsyncIteration):
            msg = "the engine ended the request without a finished output"
            return OpenAIError(HTTPStatus.INTERNAL_SERVER_ERROR, msg)
        if isinstance(exc, EngineDeadError):
            return OpenAIError(HTTPStatus.SERVICE_UNAVAILABLE, f"engine is dead: {exc}")
        logger.exception("request %s failed", self.request_id)
        return OpenAIError(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}")

    async def is_disconnected(self) -> bool:
        return await self.raw_request.is_disconnected()

    async def close(self, *, abort: bool = True) -> None:
        """Aborts the engine request unless it finished (or `abort` is False: the engine
        refused it), and frees the concurrency slot.
        Shielded: it runs to the end even while the handler is being cancelled (client
        disconnect), which is exactly when the abort matters."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            try:
                if abort and not self._finished:
                    await self._abort()
            finally:
                self.ctx.limiter.release()
                self.ctx.metrics.in_flight.dec()

    async def _abort(self) -> None:
        self.tracker.finish("abort", self.num_prompt_tokens)
        aclose = getattr(self.iterator, "aclose", None)
        try:
            await self.ctx.engine.abort(self.request_id)
            if aclose is not None:
                await aclose()
        except Exception:
            logger.exception("aborting request %s failed", self.request_id)
