"""`OpenAIHTTPBackend`: streams ``/v1/completions`` from an OpenAI-compatible server;
`OpenAIChatHTTPBackend` streams ``/v1/chat/completions`` (``--backend openai-chat``).

The request is what ``vllm bench serve --backend openai`` sends, with the prompt as token
ids: ``stream: true``, ``stream_options: {"include_usage": true}``, ``ignore_eos``,
``max_tokens = min_tokens = output_len``. The answer is Server-Sent Events: ``data: {...}``
lines, then ``data: [DONE]``. A chunk with choices is content: the first sets TTFT, each
later one adds an ITL gap (a chunk carrying only a finish_reason and no text is not a
token). The usage chunk's ``completion_tokens`` is the output length. An error object in
the stream (``{"error": {...}}`` or ``{"object": "error", ...}``) fails the request.

The chat client sends the prompt as text (the prompt ids decoded) in one user message, with
``max_completion_tokens``; a chunk's text is ``delta.content``, and the role chunk (a
``role`` and no content) is no token. Its prompt length is the usage chunk's ``prompt_tokens``
(the chat template adds tokens), as vLLM's chat client takes it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from distserve_rt.benchmarks.serving.record import RequestRecord
from distserve_rt.benchmarks.serving.request_set import BenchRequest

DONE = "[DONE]"


def parse_sse_line(line: str) -> dict[str, Any] | str | None:
    """The JSON object of a ``data:`` line, `DONE` for ``data: [DONE]``, None otherwise
    (blank lines, comments, ``event:``/``id:`` fields). ValueError for a malformed line."""
    line = line.strip()
    if not line.startswith("data:"):
        return None
    payload = line[len("data:") :].strip()
    if payload == DONE:
        return DONE
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise ValueError(f"malformed SSE data line {line[:200]!r}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"SSE data is not a JSON object: {line[:200]!r}")
    return data


def stream_error(data: dict[str, Any]) -> str | None:
    """The message of an error object in the stream, None for a normal chunk."""
    if "error" in data:
        err = data["error"]
        return str(err.get("message", err)) if isinstance(err, dict) else str(err)
    if data.get("object") == "error":
        return str(data.get("message", data))
    return None


@dataclass
class StreamState:
    """Folds the chunks of one stream into a `RequestRecord`."""

    record: RequestRecord
    text: list[str] = field(default_factory=list)
    last_chunk: float = 0.0
    num_chunks: int = 0
    usage_tokens: int | None = None
    usage_prompt_tokens: int | None = None
    done: bool = False

    def on_event(self, data: dict[str, Any] | str, now: float) -> None:
        """One parsed SSE event received at ``now`` (perf_counter seconds)."""
        if data == DONE:
            self.done = True
            return
        assert isinstance(data, dict)
        error = stream_error(data)
        if error is not None:
            self.record.fail(f"server error in stream: {error}")
            return
        if data.get("usage"):
            self.usage_tokens = int(data["usage"].get("completion_tokens", 0))
            if data["usage"].get("prompt_tokens") is not None:
                self.usage_prompt_tokens = int(data["usage"]["prompt_tokens"])
        choices = data.get("choices") or []
        if not choices:
            return
        delta = choices[0].get("delta")
        if isinstance(delta, dict):  # a chat chunk
            if "role" in delta and not delta.get("content"):
                return  # the role chunk opens the stream; it carries no token
            # content "" is still a token (bytes of a character not yet complete)
            text = delta.get("content") or ""
        else:
            text = choices[0].get("text") or ""
        if not text and choices[0].get("finish_reason") is not None:
            return
        if self.num_chunks == 0:
            self.record.ttft = now - self.record.start_time
        else:
            self.record.itl.append(now - self.last_chunk)
        self.last_chunk = now
        self.num_chunks += 1
        self.text.append(text)

    def finish(self, now: float) -> None:
        """Sets e2e, text and output length; fails the record if the stream was incomplete."""
        record = self.record
        record.e2e = now - record.start_time
        record.generated_text = "".join(self.text)
        # Without a usage chunk, count chunks: exact when the server sends one per token.
        record.output_len = self.usage_tokens if self.usage_tokens is not None else self.num_chunks
        if record.error:
            return
        if not self.done:
            record.fail("the stream ended without 'data: [DONE]'")
        elif self.num_chunks == 0:
            record.fail("the stream carried no content chunk")
        else:
            record.success = True


class OpenAIHTTPBackend:
    """Client of ``{base_url}/v1/completions``; one pooled `httpx.AsyncClient` per run.

    ``transport`` lets tests serve the stream from memory (`httpx.MockTransport`).
    """

    name = "openai"
    default_endpoint = "/v1/completions"

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        model: str,
        temperature: float = 0.0,
        transport: httpx.AsyncBaseTransport | None = None,
        endpoint: str | None = None,
        name: str | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No client-side timeout: the runner's per-request timeout bounds each request.
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=None,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
            transport=transport,
        )
        self.model = model
        self.temperature = temperature
        self.endpoint = endpoint or self.default_endpoint
        self.name = name or self.name  # --backend as typed (vllm, openai), for the JSON

    def payload(self, request: BenchRequest) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt": request.prompt_token_ids,
            "max_tokens": request.output_len,
            "min_tokens": request.output_len,
            "ignore_eos": True,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async def send(self, request: BenchRequest, record: RequestRecord) -> None:
        state = StreamState(record)
        headers = {"X-Request-Id": request.request_id}
        body = self.payload(request)
        async with self._client.stream(
            "POST", self.endpoint, json=body, headers=headers
        ) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:500]
                record.e2e = time.perf_counter() - record.start_time
                record.fail(f"HTTP {response.status_code}: {detail}")
                return
            async for line in response.aiter_lines():
                event = parse_sse_line(line)
                if event is not None:
                    state.on_event(event, time.perf_counter())
        state.finish(time.perf_counter())
        if self.prompt_len_from_usage and state.usage_prompt_tokens is not None:
            record.prompt_len = state.usage_prompt_tokens

    prompt_len_from_usage = False

    async def close(self) -> None:
        await self._client.aclose()


class OpenAIChatHTTPBackend(OpenAIHTTPBackend):
    """Client of ``{base_url}/v1/chat/completions`` (``--backend openai-chat``).

    ``decode`` turns the request's prompt ids into the message text (the tokenizer's)."""

    name = "openai-chat"
    default_endpoint = "/v1/chat/completions"
    prompt_len_from_usage = True

    def __init__(self, *args, decode: Callable[[Sequence[int]], str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.decode = decode

    def payload(self, request: BenchRequest) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": self.decode(request.prompt_token_ids)}],
            "max_completion_tokens": request.output_len,
            "min_tokens": request.output_len,
            "ignore_eos": True,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }


READY_PATHS = ("/health", "/v1/models")


async def wait_until_ready(
    probe: Callable[[], Awaitable[str | None]],
    timeout_s: float,
    *,
    what: str,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    interval_s: float = 1.0,
) -> None:
    """Calls ``probe`` (None: ready, else why not) until it answers None or ``timeout_s``
    has passed on ``clock``; then ValueError naming the flag, ``what`` and the last reason.
    ``clock``/``sleep`` are injectable so tests drive time instead of waiting."""
    if not timeout_s > 0:
        raise ValueError(f"--ready-check-timeout-sec must be > 0 seconds, got {timeout_s!r}")
    deadline = clock() + timeout_s
    while True:
        reason = await probe()
        if reason is None:
            return
        left = deadline - clock()
        if left <= 0:
            raise ValueError(
                f"--ready-check-timeout-sec {timeout_s:g}: {what} was not ready within "
                f"{timeout_s:g} s (last: {reason})"
            )
        await sleep(min(interval_s, left))


def http_ready_probe(
    base_url: str, api_key: str | None = None, **client_kw
) -> Callable[[], Awaitable[str | None]]:
    """A probe for `wait_until_ready`: GET /health, else /v1/models (a server without
    /health), 200 meaning ready; a refused connection or other status is the reason."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def probe() -> str | None:
        reason = "no answer"
        async with httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=headers, timeout=5.0, **client_kw
        ) as client:
            for path in READY_PATHS:
                try:
                    response = await client.get(path)
                except httpx.TransportError as exc:
                    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if response.status_code == 200:
                    return None
                reason = f"GET {path}: HTTP {response.status_code}"
        return reason

    return probe


async def fetch_model_card(base_url: str, api_key: str | None = None, **client_kw) -> dict:
    """The first entry of ``GET {base_url}/v1/models`` (id, and max_model_len when served)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, **client_kw) as c:
        response = await c.get("/v1/models")
        response.raise_for_status()
        models = response.json().get("data") or []
    if not models:
        raise ValueError(f"{base_url}/v1/models lists no model; pass --model")
    return models[0]
