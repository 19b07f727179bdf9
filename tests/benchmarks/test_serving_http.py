"""The OpenAI HTTP backend: SSE parsing, the request body, usage and error chunks, HTTP
errors, against streams served from memory (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from distserve_rt.benchmarks.serving.http_backend import (
    DONE,
    OpenAIHTTPBackend,
    fetch_model_card,
    parse_sse_line,
)
from distserve_rt.benchmarks.serving.record import RequestRecord
from distserve_rt.benchmarks.serving.request_set import BenchRequest

REQUEST = BenchRequest("req-7", [5, 6, 7], 3, 0.0)


def chunk(text, finish=None, usage=None):
    body = {"id": "c", "object": "text_completion", "choices": []}
    if text is not None:
        body["choices"] = [{"index": 0, "text": text, "finish_reason": finish}]
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n".encode()


def serve(events: list[bytes], status: int = 200, seen: list | None = None, delay=0.0):
    async def body():
        for e in events:
            await asyncio.sleep(delay)
            yield e

    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        if status != 200:
            return httpx.Response(status, json={"error": {"message": "queue full"}})
        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handler)


def send(transport, api_key=None) -> RequestRecord:
    async def go():
        backend = OpenAIHTTPBackend("http://test", api_key, model="m", transport=transport)
        record = RequestRecord(REQUEST.request_id, REQUEST.prompt_len, REQUEST.output_len)
        record.start_time = time.perf_counter()
        try:
            await backend.send(REQUEST, record)
        finally:
            await backend.close()
        return record

    return asyncio.run(go())


def test_parse_sse_line():
    assert parse_sse_line("data: [DONE]") == DONE
    assert parse_sse_line('data: {"a": 1}') == {"a": 1}
    assert parse_sse_line("") is None and parse_sse_line(": keep-alive") is None
    assert parse_sse_line("event: message") is None
    with pytest.raises(ValueError, match="malformed SSE"):
        parse_sse_line("data: {oops")


def test_stream_with_usage_chunk_and_request_body():
    seen: list[httpx.Request] = []
    events = [
        chunk("a"),
        chunk("bc"),  # one chunk, two tokens: usage gives the count
        chunk("", finish="length"),  # finish-only chunk: not a token
        chunk(None, usage={"prompt_tokens": 3, "completion_tokens": 3}),
        b"data: [DONE]\n\n",
    ]
    record = send(serve(events, seen=seen, delay=0.005), api_key="sk-x")
    assert record.success and record.error == ""
    assert record.output_len == 3 and record.generated_text == "abc"
    assert len(record.itl) == 1 and record.ttft > 0 and record.e2e >= record.ttft
    body = json.loads(seen[0].content)
    assert body["prompt"] == [5, 6, 7] and body["stream"] is True
    assert body["max_tokens"] == body["min_tokens"] == 3 and body["ignore_eos"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert seen[0].headers["authorization"] == "Bearer sk-x"
    assert seen[0].url.path == "/v1/completions"


def test_without_usage_chunks_are_counted():
    record = send(serve([chunk("x"), chunk("y"), chunk("z", "length"), b"data: [DONE]\n"]))
    assert record.success and record.output_len == 3 and len(record.itl) == 2


@pytest.mark.parametrize(
    "error_event",
    [
        b'data: {"error": {"message": "KV transfer timed out", "code": 500}}\n\n',
        b'data: {"object": "error", "message": "KV transfer timed out"}\n\n',
    ],
)
def test_error_event_fails_the_request(error_event):
    record = send(serve([chunk("a"), error_event, b"data: [DONE]\n\n"]))
    assert not record.success
    assert record.error == "server error in stream: KV transfer timed out"


def test_http_error_and_truncated_stream_fail():
    record = send(serve([], status=503))
    assert (
        not record.success and record.error.startswith("HTTP 503") and "queue full" in record.error
    )
    record = send(serve([chunk("a")]))
    assert not record.success and "without 'data: [DONE]'" in record.error


def test_model_card_and_base_url_check():
    def handler(request):
        return httpx.Response(200, json={"data": [{"id": "tiny", "max_model_len": 128}]})

    card = asyncio.run(fetch_model_card("http://x", transport=httpx.MockTransport(handler)))
    assert card == {"id": "tiny", "max_model_len": 128}
    with pytest.raises(ValueError, match="base_url must start with http"):
        OpenAIHTTPBackend("localhost:8000", model="m")
