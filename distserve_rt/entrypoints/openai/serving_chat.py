"""``POST /v1/chat/completions``: messages rendered with the model's chat template; n > 1
gives n choices (indices 0..n-1) of one engine request (`engine.parallel_sampling`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from distserve_rt.entrypoints.openai.errors import OpenAIError, bad_request
from distserve_rt.entrypoints.openai.logprobs import chat_logprobs
from distserve_rt.entrypoints.openai.protocol import ChatCompletionRequest, ChatMessage
from distserve_rt.entrypoints.openai.responses import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaMessage,
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
    OutputDelta,
    SSEResponse,
    internal_error,
    sse,
)


def message_text(message: ChatMessage, index: int) -> str:
    """A message's content as text: a string, or its text parts joined by newlines (as
    vLLM does). Images and other parts are refused, not dropped."""
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for j, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise bad_request(
                f"messages[{index}].content[{j}] has type {part.type!r}; only text parts "
                "({'type': 'text', 'text': ...}) are supported",
                f"messages.{index}.content",
            )
        texts.append(part.text)
    return "\n".join(texts)


class OpenAIServingChat:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        self.ctx.check_model(request.model)
        prompt_ids = self._prompt_ids(request)
        max_tokens = request.max_completion_tokens
        if max_tokens is None:
            max_tokens = request.max_tokens
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request(
                f"top_logprobs={request.top_logprobs} needs logprobs=true", "top_logprobs"
            )
        params = sampling_params(
            self.ctx,
            request,
            num_prompt_tokens=len(prompt_ids),
            max_tokens=max_tokens,
            logprobs=(request.top_logprobs or 0) if request.logprobs else None,
            prompt_param="messages",
        )
        request_id = random_id("chatcmpl")
        generation = await start_generation(self.ctx, request_id, prompt_ids, params, raw_request)
        if request.stream:
            return SSEResponse(self._stream(generation, request))
        try:
            return await self._full(generation, request)
        finally:
            await generation.close()

    def _prompt_ids(self, request: ChatCompletionRequest) -> list[int]:
        messages = [
            {"role": m.role, "content": message_text(m, i)} for i, m in enumerate(request.messages)
        ]
        tokenizer = self.ctx.engine.tokenizer
        try:
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=request.add_generation_prompt
            )
        except (ValueError, ImportError) as exc:
            raise bad_request(f"cannot apply the chat template: {exc}", "messages") from exc
        except Exception as exc:  # jinja2's TemplateError (raise_exception in templates)
            if type(exc).__module__.startswith("jinja2"):
                raise bad_request(f"the chat template refused: {exc}", "messages") from exc
            raise
        ids = tokenizer.encode(text, add_special_tokens=request.add_special_tokens)
        self.ctx.check_prompt_ids(ids, "messages")
        return ids

    def _logprobs(self, request: ChatCompletionRequest, delta: OutputDelta):
        if not request.logprobs:
            return None
        tokenizer = self.ctx.engine.tokenizer
        return chat_logprobs(
            tokenizer, delta.token_ids, delta.logprobs or [], request.top_logprobs or 0
        )

    async def _full(self, generation: Generation, request: ChatCompletionRequest) -> Response:
        final = None
        async for output in generation.outputs():
            final = output
            if not output.finished and await generation.is_disconnected():
                break  # close() aborts it; nobody is left to answer
        if final is None or not final.finished:
            return Response(status_code=499)
        tracker = ChoiceTracker()
        choices = [
            ChatChoice(
                index=news.completion.index,
                message=ChatResponseMessage(role="assistant", content=news.completion.text),
                logprobs=self._logprobs(request, news.delta),
                finish_reason=news.completion.finish_reason,
                stop_reason=news.completion.stop_reason,
            )
            for news in tracker.next(final)
        ]
        body = ChatCompletionResponse(
            id=generation.request_id,
            created=now_s(),
            model=self.ctx.model_name,
            choices=choices,
            usage=UsageInfo.of(generation.num_prompt_tokens, tracker.num_tokens),
        )
        return JSONResponse(body.model_dump())

    def _chunk(self, generation: Generation, created: int, choices, usage=None):
        return ChatCompletionChunk(
            id=generation.request_id,
            created=created,
            model=self.ctx.model_name,
            choices=choices,
            usage=usage,
        )

    def _content_choice(
        self, request: ChatCompletionRequest, news: ChoiceDelta
    ) -> ChatStreamChoice:
        completion = news.completion
        return ChatStreamChoice(
            index=completion.index,
            delta=DeltaMessage(content=news.delta.text),
            logprobs=self._logprobs(request, news.delta),
            finish_reason=completion.finish_reason if news.finished else None,
            stop_reason=completion.stop_reason if news.finished else None,
        )

    async def _stream(
        self, generation: Generation, request: ChatCompletionRequest
    ) -> AsyncIterator[str]:
        options = request.stream_options
        continuous = bool(options and options.continuous_usage_stats)
        created, tracker = now_s(), ChoiceTracker()
        try:
            roles = [
                ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                for i in range(request.n)
            ]
            usage = UsageInfo.of(generation.num_prompt_tokens, 0) if continuous else None
            yield sse(self._chunk(generation, created, roles, usage))
            async for output in generation.outputs():
                news = tracker.next(output)
                if not news:
                    continue
                choices = [self._content_choice(request, n) for n in news]
                usage = None
                if continuous:
                    usage = UsageInfo.of(generation.num_prompt_tokens, tracker.num_tokens)
                yield sse(self._chunk(generation, created, choices, usage))
            if options and options.include_usage:
                usage = UsageInfo.of(generation.num_prompt_tokens, tracker.num_tokens)
                yield sse(self._chunk(generation, created, [], usage))
        except OpenAIError as exc:
            yield exc.sse_event()
        except Exception as exc:
            yield internal_error(exc, generation.request_id).sse_event()
        finally:
            await generation.close()
        yield DONE_EVENT
