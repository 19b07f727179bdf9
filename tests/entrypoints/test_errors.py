"""Refusals and failures: every bad field is a 400 naming it; 401, 404, 429, 503, 500; a
failing request never affects the others; a client disconnect aborts the engine request."""

from __future__ import annotations

import asyncio

import pytest

# The HTTP server's dependencies: absent on the GPU machine, where these tests skip.
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from distserve_rt.entrypoints.openai import build_app
from tests.entrypoints.conftest import make_client, parse_sse

pytestmark = pytest.mark.anyio

BAD_COMPLETION_FIELDS = [
    ({"max_tokens": "abc"}, "max_tokens", "valid integer"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be an int >= 1"),
    ({"temperature": -1}, "temperature", "temperature must be a finite number"),
    ({"temperature": "hot"}, "temperature", "valid number"),
    ({"top_p": 0}, "top_p", "top_p must be"),
    ({"top_k": -2}, "top_k", "top_k must be"),
    ({"min_p": 2}, "min_p", "min_p must be"),
    ({"seed": -1}, "seed", "seed must be"),
    ({"stop": [""]}, "stop", "stop must be a list of non-empty strings"),
    ({"stop": 5}, "stop", "valid string"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", "stop_token_ids[] must be"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens", "min_tokens (5) must be <="),
    ({"ignore_eos": "maybe"}, "ignore_eos", "valid boolean"),
    ({"n": 0}, "n", "n must be an int >= 1, got 0"),
    ({"n": 3, "best_of": 2}, "best_of", "best_of must be >= n (3), got 2"),
    ({"presence_penalty": 0.5}, "presence_penalty", "penalties are not supported"),
    ({"frequency_penalty": -1}, "frequency_penalty", "penalties are not supported"),
    ({"repetition_penalty": 1.2}, "repetition_penalty", "penalties are not supported"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias", "not supported"),
    ({"echo": True}, "echo", "echo is not supported"),
    ({"logprobs": 21}, "logprobs", "logprobs must be in [0, 20]"),
    (
        {"response_format": {"type": "json_object"}},
        "response_format",
        "response_format 'json_object' is not supported yet",
    ),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream"),
    ({"prompt": ["a", ""]}, "prompt", "prompt[1] is an empty string"),
    ({"prompt": [[5], [1, 9999]]}, "prompt", "prompt[1][1] = 9999 is not a token id"),
    ({"prompt": []}, "prompt", "prompt is empty"),
    ({"prompt": [1, 9999]}, "prompt", "prompt[1] = 9999 is not a token id in [0, 512)"),
    ({"prompt": 5}, "prompt", "valid"),
    ({"prompt": "x" * 200}, "prompt", "the prompt has 201 tokens but max_model_len is 128"),
    ({"prompt": "x" * 100, "max_tokens": 50}, "max_tokens", "101 prompt tokens + max_tokens 50"),
]


@pytest.mark.parametrize(("fields", "param", "message"), BAD_COMPLETION_FIELDS)
async def test_bad_completion_field_is_400_naming_it(client, engine, fields, param, message):
    r = await client.post("/v1/completions", json={"prompt": "hi", **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400
    assert error["param"] == param
    assert message in error["message"]
    assert not engine.requests  # refused before reaching the engine


BAD_CHAT_FIELDS = [
    ({"messages": []}, "messages", "at least 1 item"),
    ({"messages": [{"content": "x"}]}, "messages.0.role", "Field required"),
    ({"top_logprobs": 2}, "top_logprobs", "needs logprobs=true"),
    ({"logprobs": True, "top_logprobs": 50}, "logprobs", "logprobs must be in [0, 20]"),
    ({"tools": [{"type": "function"}]}, "tools", "tool calling is not supported yet"),
    ({"tool_choice": "required"}, "tool_choice", "tool calling is not supported yet"),
    (
        {"response_format": {"type": "json_object"}},
        "response_format",
        "response_format 'json_object' is not supported yet",
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        "response_format",
        "response_format 'json_schema' is not supported yet",
    ),
    ({"max_completion_tokens": 500}, "max_tokens", "lower max_tokens"),
]


@pytest.mark.parametrize(("fields", "param", "message"), BAD_CHAT_FIELDS)
async def test_bad_chat_field_is_400_naming_it(client, fields, param, message):
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert message in r.json()["error"]["message"]


async def test_missing_body_and_invalid_json_are_400(client):
    r = await client.post("/v1/completions", json={})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = await client.post(
        "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


async def test_unknown_model_is_404(client):
    r = await client.post("/v1/completions", json={"prompt": "hi", "model": "gpt-9"})
    assert r.status_code == 404
    assert r.json()["error"]["param"] == "model" and "fake-model" in r.json()["error"]["message"]


async def test_api_key_guards_v1_but_not_health_or_metrics(engine):
    async with make_client(build_app(engine, api_key="s3cret")) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = await c.post("/v1/completions", json={"prompt": "hi"}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
        assert (await c.get("/v1/models")).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers=ok)
        assert r.status_code == 200
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200


async def test_concurrency_limit_is_429_and_the_slot_comes_back(engine):
    engine.token_delay_s = 0.01
    async with make_client(build_app(engine, max_concurrent=1)) as c:
        body = {"prompt": "hi", "max_tokens": 20, "stream": True}
        first = asyncio.create_task(c.post("/v1/completions", json=body))
        while not engine.running:
            await asyncio.sleep(0.002)
        r = await c.post("/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 429 and r.json()["error"]["type"] == "RateLimitError"
        assert (await first).status_code == 200
        r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert r.status_code == 200


@pytest.mark.parametrize("stream", [False, True])
async def test_overloaded_engine_is_503(client, engine, stream):
    engine.overloaded = True
    r = await client.post("/v1/completions", json={"prompt": "hi", "stream": stream})
    assert r.status_code == 503 and "overloaded" in r.json()["error"]["message"]
    assert (await client.get("/health")).status_code == 200


async def test_dead_engine_is_503_and_health_503(client, engine):
    engine.dead = True
    body = {"messages": [{"role": "user", "content": "x"}]}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 503 and "dead" in r.json()["error"]["message"]
    r = await client.get("/health")
    assert r.status_code == 503 and r.json()["error"]["code"] == 503


@pytest.mark.parametrize("prompt", ["FAIL", "RAISE"])
async def test_failure_mid_way_non_streaming_is_500(client, prompt):
    r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8})
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "InternalServerError"
    assert ("fake generation failure" if prompt == "FAIL" else "fake engine crash") in error[
        "message"
    ]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("prompt", ["FAIL", "RAISE"])
async def test_failure_mid_stream_is_an_error_event_then_done(client, path, prompt):
    if path == "/v1/completions":
        body = {"prompt": prompt, "max_tokens": 8, "stream": True}
    else:
        body = {"messages": [{"role": "user", "content": prompt}], "stream": True}
    r = await client.post(path, json=body)
    assert r.status_code == 200
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == 500
    assert all("error" not in e for e in events[:-2])


async def test_twenty_concurrent_streams_one_failing(client, engine):
    async def one(i: int):
        prompt = "FAIL" if i == 7 else f"request {i}"
        body = {"prompt": prompt, "max_tokens": 8, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        return parse_sse((await client.post("/v1/completions", json=body)).text)

    results = await asyncio.gather(*(one(i) for i in range(20)))
    for i, events in enumerate(results):
        assert events[-1] == "[DONE]"
        if i == 7:
            assert "error" in events[-2]
            continue
        text = "".join(e["choices"][0]["text"] for e in events[:-2])
        assert text == "abcdefgh" and events[-2]["usage"]["completion_tokens"] == 8
    assert len(engine.requests) == 20 and not engine.running and not engine.aborted
