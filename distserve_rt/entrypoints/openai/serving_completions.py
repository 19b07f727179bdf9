"""``POST /v1/completions``: one prompt (text or token ids), streamed or not."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from distserve_rt.entrypoints.openai.errors import OpenAIError, bad_request
from distserve_rt.entrypoints.openai.logprobs import completion_logprobs
from distserve_rt.entrypoints.openai.protocol import CompletionRequest
from distserve_rt.entrypoints.openai.responses import (
    CompletionChoice,
    CompletionResponse,
    UsageInfo,
    now_s,
    random_id,
)
from distserve_rt.entrypoints.openai.serving_engine import (
    Generation,
    ServingContext,
    sampling_params,
    start_generation,
)
from distserve_rt.entrypoints.openai.streaming import (
    DONE_EVENT,
    DeltaTracker,
    SSEResponse,
    internal_error,
    sse,
)
from distserve_rt.outputs import RequestOutput

DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for completions when max_tokens is absent (null means "up to the
context length", as in vLLM)."""


class OpenAIServingCompletion:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, request: CompletionRequest, raw_request: Request) -> Response:
        self.ctx.check_model(request.model)
        prompt_ids = self._prompt_ids(request)
        max_tokens = request.max_tokens
        if "max_tokens" not in request.model_fields_set:
            max_tokens = min(DEFAULT_MAX_TOKENS, self.ctx.engine.max_model_len - len(prompt_ids))
        params = sampling_params(
            self.ctx,
            request,
            num_prompt_tokens=len(prompt_ids),
            max_tokens=max_tokens,
            logprobs=request.logprobs,
            prompt_param="prompt",
        )
        request_id = random_id("cmpl")
        generation = await start_generation(self.ctx, request_id, prompt_ids, params, raw_request)
        if request.stream:
            return SSEResponse(self._stream(generation, request))
        try:
            return await self._full(generation, request)
        finally:
            await generation.close()

    def _prompt_ids(self, request: CompletionRequest) -> list[int]:
        prompt = request.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise bad_request(
                    f"batched prompts are not supported: got a list of {len(prompt)} "
                    "prompts; send one prompt per request",
                    "prompt",
                )
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                # Refused like an empty token list, though a BOS-adding tokenizer would
                # turn it into one token: there is nothing to complete (vLLM refuses it too).
                raise bad_request(
                    "prompt is an empty string; send at least one character", "prompt"
                )
            tokenizer = self.ctx.engine.tokenizer
            ids = tokenizer.encode(prompt, add_special_tokens=request.add_special_tokens)
        else:
            ids = list(prompt)
        self.ctx.check_prompt_ids(ids, "prompt")
        return ids

    def _choice(self, request: CompletionRequest, out: RequestOutput, delta) -> CompletionChoice:
        completion = out.outputs[0]
        logprobs = None
        if request.logprobs is not None:
            logprobs = completion_logprobs(
                self.ctx.engine.tokenizer,
                delta.token_ids,
                delta.logprobs or [],
                request.logprobs,
                delta.text_offset,
            )
        return CompletionChoice(
            index=0,
            text=delta.text,
            logprobs=logprobs,
            finish_reason=completion.finish_reason if out.finished else None,
            stop_reason=completion.stop_reason if out.finished else None,
        )

    async def _full(self, generation: Generation, request: CompletionRequest) -> Response:
        final = None
        async for output in generation.outputs():
            final = output
            if not output.finished and await generation.is_disconnected():
                break  # close() aborts it; nobody is left to answer
        if final is None or not final.finished:
            return Response(status_code=499)
        choice = self._choice(request, final, DeltaTracker().next(final.outputs[0]))
        body = CompletionResponse(
            id=generation.request_id,
            created=now_s(),
            model=self.ctx.model_name,
            choices=[choice],
            usage=UsageInfo.of(generation.num_prompt_tokens, len(final.outputs[0].token_ids)),
        )
        return JSONResponse(body.model_dump())

    async def _stream(
        self, generation: Generation, request: CompletionRequest
    ) -> AsyncIterator[str]:
        options = request.stream_options
        created, tracker = now_s(), DeltaTracker()
        try:
            async for output in generation.outputs():
                delta = tracker.next(output.outputs[0])
                if not delta.token_ids and not delta.text and not output.finished:
                    continue
                chunk = CompletionResponse(
                    id=generation.request_id,
                    created=created,
                    model=self.ctx.model_name,
                    choices=[self._choice(request, output, delta)],
                )
                if options and options.continuous_usage_stats:
                    chunk.usage = UsageInfo.of(generation.num_prompt_tokens, tracker.num_tokens)
                yield sse(chunk)
            if options and options.include_usage:
                usage = UsageInfo.of(generation.num_prompt_tokens, tracker.num_tokens)
                yield sse(
                    CompletionResponse(
                        id=generation.request_id,
                        created=created,
                        model=self.ctx.model_name,
                        choices=[],
                        usage=usage,
                    )
                )
        except OpenAIError as exc:
            yield exc.sse_event()
        except Exception as exc:
            yield internal_error(exc, generation.request_id).sse_event()
        finally:
            await generation.close()
        yield DONE_EVENT
