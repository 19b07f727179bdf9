"""``POST /v1/completions``: a prompt (text or token ids) or a batch of them, streamed or not.

Each prompt is one engine request with n choices (n > 1 and best_of: the colocated engine
forks the prompt's KV, the disaggregated one runs child requests; `engine.parallel_sampling`);
choices are indexed prompt-major as OpenAI and vLLM do: prompt i's choice j has index
``i * n + j``. Usage counts every prompt's tokens and every returned choice's generated
tokens. A streamed batch sends prompt 0's chunks, then prompt 1's, ... (the engine runs
them together; their outputs wait in its queues).
"""

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
    ChoiceDelta,
    ChoiceTracker,
    SSEResponse,
    internal_error,
    sse,
)

DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for completions when max_tokens is absent (null means "up to the
context length", as in vLLM)."""


class OpenAIServingCompletion:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, request: CompletionRequest, raw_request: Request) -> Response:
        self.ctx.check_model(request.model)
        prompts = self._prompts_ids(request)
        request_id = random_id("cmpl")
        # Every prompt is checked before any is admitted: a bad one refuses the batch.
        params_list = [self._params(request, prompt_ids) for prompt_ids in prompts]
        generations: list[Generation] = []
        try:
            for i, (prompt_ids, params) in enumerate(zip(prompts, params_list, strict=True)):
                # One engine request per prompt; a lone prompt keeps the response's id.
                engine_id = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                generations.append(
                    await start_generation(self.ctx, engine_id, prompt_ids, params, raw_request)
                )
        except BaseException:
            for generation in generations:
                await generation.close()
            raise
        if request.stream:
            return SSEResponse(self._stream(request_id, generations, request))
        try:
            return await self._full(request_id, generations, request)
        finally:
            for generation in generations:
                await generation.close()

    def _params(self, request: CompletionRequest, prompt_ids: list[int]):
        max_tokens = request.max_tokens
        if "max_tokens" not in request.model_fields_set:
            max_tokens = min(DEFAULT_MAX_TOKENS, self.ctx.engine.max_model_len - len(prompt_ids))
        return sampling_params(
            self.ctx,
            request,
            num_prompt_tokens=len(prompt_ids),
            max_tokens=max_tokens,
            logprobs=request.logprobs,
            prompt_param="prompt",
        )

    def _prompts_ids(self, request: CompletionRequest) -> list[list[int]]:
        prompt = request.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) == 1:
                return [self._prompt_ids(request, prompt[0], "prompt")]
            return [self._prompt_ids(request, p, f"prompt[{i}]") for i, p in enumerate(prompt)]
        return [self._prompt_ids(request, prompt, "prompt")]

    def _prompt_ids(self, request: CompletionRequest, prompt, param: str) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                # Refused like an empty token list, though a BOS-adding tokenizer would
                # turn it into one token: there is nothing to complete (vLLM refuses it too).
                raise bad_request(
                    f"{param} is an empty string; send at least one character", "prompt"
                )
            tokenizer = self.ctx.engine.tokenizer
            ids = tokenizer.encode(prompt, add_special_tokens=request.add_special_tokens)
        else:
            ids = list(prompt)
        self.ctx.check_prompt_ids(ids, "prompt", param)
        return ids

    def _choice(
        self, request: CompletionRequest, news: ChoiceDelta, base_index: int
    ) -> CompletionChoice:
        completion, delta = news.completion, news.delta
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
            index=base_index + completion.index,
            text=delta.text,
            logprobs=logprobs,
            finish_reason=completion.finish_reason if news.finished else None,
            stop_reason=completion.stop_reason if news.finished else None,
        )

    async def _full(
        self, request_id: str, generations: list[Generation], request: CompletionRequest
    ) -> Response:
        choices, num_prompt_tokens, num_tokens = [], 0, 0
        for i, generation in enumerate(generations):
            final = None
            async for output in generation.outputs():
                final = output
                if not output.finished and await generation.is_disconnected():
                    break  # close() aborts it; nobody is left to answer
            if final is None or not final.finished:
                return Response(status_code=499)
            tracker = ChoiceTracker()
            choices += [self._choice(request, c, i * request.n) for c in tracker.next(final)]
            num_prompt_tokens += generation.num_prompt_tokens
            num_tokens += tracker.num_tokens
        body = CompletionResponse(
            id=request_id,
            created=now_s(),
            model=self.ctx.model_name,
            choices=choices,
            usage=UsageInfo.of(num_prompt_tokens, num_tokens),
        )
        return JSONResponse(body.model_dump())

    async def _stream(
        self, request_id: str, generations: list[Generation], request: CompletionRequest
    ) -> AsyncIterator[str]:
        options = request.stream_options
        created = now_s()
        trackers = [ChoiceTracker() for _ in generations]

        def usage() -> UsageInfo:
            num_prompt_tokens = sum(g.num_prompt_tokens for g in generations)
            return UsageInfo.of(num_prompt_tokens, sum(t.num_tokens for t in trackers))

        try:
            for i, generation in enumerate(generations):
                async for output in generation.outputs():
                    news = trackers[i].next(output)
                    if not news:
                        continue
                    chunk = CompletionResponse(
                        id=request_id,
                        created=created,
                        model=self.ctx.model_name,
                        choices=[self._choice(request, c, i * request.n) for c in news],
                    )
                    if options and options.continuous_usage_stats:
                        chunk.usage = usage()
                    yield sse(chunk)
            if options and options.include_usage:
                yield sse(
                    CompletionResponse(
                        id=request_id,
                        created=created,
                        model=self.ctx.model_name,
                        choices=[],
                        usage=usage(),
                    )
                )
        except OpenAIError as exc:
            yield exc.sse_event()
        except Exception as exc:
            yield internal_error(exc, request_id).sse_event()
        finally:
            for generation in generations:
                await generation.close()
        yield DONE_EVENT
