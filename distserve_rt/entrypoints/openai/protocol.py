"""Request bodies of the OpenAI-compatible API (pydantic), as vLLM's server accepts them.

Unknown fields are ignored (vLLM and the OpenAI clients send extras such as ``user`` or
``repetition_penalty``); a known field with a wrong type is a 400 with pydantic's message.
Fields that would change the output but are not built (penalties, ``echo``,
``logit_bias``, ...) are accepted only at their neutral value, and refused with a 400 that
names them otherwise: a request never gets silently different sampling than it asked for.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from distserve_rt.engine.request_checks import MAX_LOGPROBS  # noqa: F401 (re-exported)

"""Most top logprobs per token a request may ask for (OpenAI's and vLLM's default limit)."""


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False
    """Send a last chunk with ``choices: []`` and the request's usage."""
    continuous_usage_stats: bool = False
    """Also put the usage so far in every chunk (vLLM extension)."""


class GenerationRequest(OpenAIBaseModel):
    """The fields completions and chat completions share."""

    model: str | None = None
    """The served model name; None means the one model this server serves."""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    n: int = 1
    """Choices per prompt (indices 0..n-1; batched prompts: prompt i's are i*n .. i*n+n-1)."""
    best_of: int | None = None
    """Sequences generated per prompt (>= n); the n with the highest cumulative logprob are
    returned. Not with stream=true when > n."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    """Only ``{"type": "text"}``: JSON output needs guided decoding, not built yet."""

    def unsupported_values(self) -> list[tuple[str, Any, str]]:
        """(field, value, what is allowed) for every field set to something not built."""
        bad = []
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":
            bad.append(
                (
                    "response_format",
                    self.response_format,
                    f'{{"type": "text"}} (response_format {kind!r} is not supported yet: '
                    "no guided decoding)",
                )
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value not in (None, 0.0):
                bad.append((name, value, "0 (penalties are not supported)"))
        if self.repetition_penalty not in (None, 1.0):
            bad.append(
                ("repetition_penalty", self.repetition_penalty, "1.0 (penalties are not supported)")
            )
        if self.logit_bias:
            bad.append(("logit_bias", self.logit_bias, "none (logit_bias is not supported)"))
        return bad


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``."""

    prompt: str | list[int] | list[str] | list[list[int]]
    """Text or token ids, or a list of prompts (a batch: each gets n choices)."""
    logprobs: int | None = None
    """Top logprobs per generated token, 0..MAX_LOGPROBS (the sampled one is always in)."""
    echo: bool = False
    suffix: str | None = None
    add_special_tokens: bool = True
    """Tokenize text prompts with the model's BOS (as vLLM does for completions)."""

    def unsupported_values(self) -> list[tuple[str, Any, str]]:
        bad = super().unsupported_values()
        if self.echo:
            bad.append(("echo", self.echo, "false (echo is not supported)"))
        if self.suffix:
            bad.append(("suffix", self.suffix, "none (suffix is not supported)"))
        return bad


class TextContentPart(OpenAIBaseModel):
    type: str
    text: str | None = None


class ChatMessage(OpenAIBaseModel):
    role: str
    content: str | list[TextContentPart] | None = None
    """Text, or a list of parts of which only ``{"type": "text"}`` ones are supported."""


class ChatCompletionRequest(GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    """OpenAI's newer name for max_tokens; wins when both are given."""
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    """False as in vLLM: chat templates put the BOS in themselves."""
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def unsupported_values(self) -> list[tuple[str, Any, str]]:
        bad = super().unsupported_values()
        # Refused, not ignored: a client asking for tool calls or JSON would otherwise get
        # free text it cannot parse. Both need guided decoding, which is not built yet.
        if self.tools:
            bad.append(("tools", "[...]", "none (tool calling is not supported yet)"))
        if self.tool_choice not in (None, "none"):
            bad.append(
                ("tool_choice", self.tool_choice, '"none" (tool calling is not supported yet)')
            )
        return bad


FinishReason = Literal["stop", "length", "abort"]
