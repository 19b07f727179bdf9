"""/v1/completions against the fake engine: shapes, streaming, usage, logprobs, and the
exact body `vllm bench serve` posts."""

from __future__ import annotations

import pytest

# The HTTP server's dependencies: absent on the GPU machine, where these tests skip.
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.entrypoints.conftest import parse_sse
from tests.entrypoints.fake_engine import letter_id

pytestmark = pytest.mark.anyio

ALPHABET = "abcdefghijklmnopqrstuvwxyz"


async def test_non_streaming_shape_and_usage(client, engine):
    r = await client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["model"] == "fake-model"
    assert body["choices"] == [
        {"index": 0, "text": "abcde", "logprobs": None, "finish_reason": "length",
         "stop_reason": None}
    ]  # fmt: skip
    # "Hello" is 5 bytes + BOS.
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 5, "total_tokens": 11}
    (submitted,) = engine.requests.values()
    assert submitted.prompt_token_ids[0] == engine.tokenizer.bos_token_id
    assert submitted.params.max_tokens == 5


async def test_default_max_tokens_is_16_and_null_means_up_to_context(client, engine):
    r = await client.post("/v1/completions", json={"prompt": "hi"})
    assert len(r.json()["choices"][0]["text"]) == 16
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": None})
    assert r.json()["usage"]["completion_tokens"] == engine.max_model_len - 3


async def test_sampling_fields_reach_the_engine(client, engine):
    body = {
        "prompt": "x", "max_tokens": 4, "temperature": 0.5, "top_p": 0.9, "top_k": 7,
        "min_p": 0.1, "seed": 3, "stop": "zz", "stop_token_ids": [9], "ignore_eos": True,
        "min_tokens": 2, "user": "ignored", "some_unknown_field": {"x": 1},
    }  # fmt: skip
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    p = next(iter(engine.requests.values())).params
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (0.5, 0.9, 7, 0.1, 3)
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.min_tokens) == (["zz"], [9], True, 2)


@pytest.mark.parametrize("prompt", [[1, 70, 71], [[1, 70, 71]], ["ab"]])
async def test_token_id_and_single_element_list_prompts(client, engine, prompt):
    r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 3


async def test_streaming_chunks_usage_and_done(client):
    body = {"prompt": "Hi", "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert len(chunks) == 4
    ids = {c["id"] for c in events[:-1]}
    assert len(ids) == 1
    for c in chunks:
        assert c["object"] == "text_completion" and c["model"] == "fake-model"
        assert c["usage"] is None
    assert "".join(c["choices"][0]["text"] for c in chunks) == "abcd"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "length"]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


async def test_streaming_without_usage_and_with_continuous_usage(client):
    body = {"prompt": "Hi", "max_tokens": 3, "stream": True}
    events = parse_sse((await client.post("/v1/completions", json=body)).text)
    assert len(events) == 4 and all(e == "[DONE]" or e["choices"] for e in events)
    body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    events = parse_sse((await client.post("/v1/completions", json=body)).text)
    assert [e["usage"]["completion_tokens"] for e in events[:-1]] == [1, 2, 3, 3]


async def test_several_tokens_per_output_stream_as_one_chunk(engine, client):
    engine.tokens_per_output = 3
    body = {"prompt": "Hi", "max_tokens": 6, "stream": True}
    events = parse_sse((await client.post("/v1/completions", json=body)).text)
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["abc", "def"]


async def test_logprobs(client):
    body = {"prompt": "Hi", "max_tokens": 3, "logprobs": 2}
    lp = (await client.post("/v1/completions", json=body)).json()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["a", "b", "c"]
    assert lp["token_logprobs"] == [-0.1, -0.1, -0.1]
    assert lp["text_offset"] == [0, 1, 2]
    assert [len(t) for t in lp["top_logprobs"]] == [2, 2, 2]
    assert lp["top_logprobs"][0] == {"a": -0.1, chr(letter_id(6) - 3): -1.0}


async def test_streaming_logprobs_follow_the_chunks(client):
    body = {"prompt": "Hi", "max_tokens": 3, "logprobs": 0, "stream": True}
    events = parse_sse((await client.post("/v1/completions", json=body)).text)
    offsets = [e["choices"][0]["logprobs"]["text_offset"] for e in events[:-1]]
    assert offsets == [[0], [1], [2]]


async def test_eos_finishes_with_stop(client):
    r = await client.post("/v1/completions", json={"prompt": "EOS", "max_tokens": 10})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == "ab"
    r = await client.post(
        "/v1/completions", json={"prompt": "EOS", "max_tokens": 10, "ignore_eos": True}
    )
    assert r.json()["choices"][0]["text"] == ALPHABET[:10]


async def test_vllm_bench_serve_body(client, engine):
    """What vllm/benchmarks/lib/endpoint_request_func.py (openai backend) posts."""
    body = {
        "model": "fake-model",
        "prompt": "The quick brown fox",
        "temperature": 0.0,
        "repetition_penalty": 1.0,
        "max_tokens": 8,
        "logprobs": None,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "min_tokens": 8,
    }
    r = await client.post("/v1/completions", json=body, headers={"Authorization": "Bearer unused"})
    assert r.status_code == 200, r.text
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
    assert text == ALPHABET[:8]
    assert events[-2]["usage"]["completion_tokens"] == 8
    params = next(iter(engine.requests.values())).params
    assert params.greedy and params.ignore_eos and params.min_tokens == 8
