"""``POST /tokenize`` and ``POST /detokenize``, with vLLM's request and response shapes.

/tokenize takes ``{model?, prompt, add_special_tokens?}`` (a completion prompt, BOS added
as /v1/completions adds it) or ``{model?, messages, add_generation_prompt?}`` (rendered by
the chat template exactly as /v1/chat/completions renders it) and answers
``{count, max_model_len, tokens, token_strs}``; /detokenize takes ``{model?, tokens}`` and
answers ``{prompt}``. Neither touches the engine: they use its tokenizer only.
"""

from __future__ import annotations

from pydantic import BaseModel, StrictInt

from distserve_rt.entrypoints.openai.errors import bad_request
from distserve_rt.entrypoints.openai.protocol import ChatMessage, OpenAIBaseModel
from distserve_rt.entrypoints.openai.serving_chat import render_chat
from distserve_rt.entrypoints.openai.serving_engine import ServingContext


class TokenizeRequest(OpenAIBaseModel):
    """vLLM's TokenizeCompletionRequest and TokenizeChatRequest in one body: exactly one of
    `prompt` and `messages`."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None
    """Default as in vLLM: True for a prompt (the model's BOS), False for messages (chat
    templates put the BOS in themselves)."""
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[StrictInt]
    """Strict: "5" or 5.0 are refused rather than silently taken for 5."""


class DetokenizeResponse(BaseModel):
    prompt: str


class OpenAIServingTokenization:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self.ctx.check_model(request.model)
        tokenizer = self.ctx.engine.tokenizer
        if (request.prompt is None) == (request.messages is None):
            given = "both" if request.prompt is not None else "neither"
            raise bad_request(
                f"send exactly one of 'prompt' (text) and 'messages' (a chat), got {given}",
                "prompt",
            )
        if request.messages is not None:
            if not request.messages:
                raise bad_request("messages is empty; send at least one message", "messages")
            text = render_chat(tokenizer, request.messages, request.add_generation_prompt)
            add_special = bool(request.add_special_tokens)
        else:
            text = request.prompt
            add_special = request.add_special_tokens is not False
        ids = tokenizer.encode(text, add_special_tokens=add_special)
        strs = None
        if request.return_token_strs:
            strs = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
        return TokenizeResponse(
            count=len(ids), max_model_len=self.ctx.engine.max_model_len, tokens=ids, token_strs=strs
        )

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.ctx.check_model(request.model)
        vocab_size = self.ctx.engine.tokenizer.vocab_size
        for i, token in enumerate(request.tokens):
            if not 0 <= token < vocab_size:
                raise bad_request(
                    f"tokens[{i}] = {token} is not a token id in [0, {vocab_size})", "tokens"
                )
        # Special tokens kept, as vLLM's /detokenize (HF's decode default) keeps them.
        text = self.ctx.engine.tokenizer.decode(request.tokens, skip_special_tokens=False)
        return DetokenizeResponse(prompt=text)
