"""/v1/chat/completions against the fake engine."""

from __future__ import annotations

import pytest

# The HTTP server's dependencies: absent on the GPU machine, where these tests skip.
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.entrypoints.conftest import parse_sse

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


async def test_non_streaming_shape_usage_and_template(client, engine):
    r = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "abc"}
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    (submitted,) = engine.requests.values()
    prompt = engine.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    # No BOS: chat templates carry their own special tokens (vLLM's default).
    assert submitted.prompt_token_ids == engine.tokenizer.encode(prompt, add_special_tokens=False)
    n = len(submitted.prompt_token_ids)
    assert body["usage"] == {"prompt_tokens": n, "completion_tokens": 3, "total_tokens": n + 3}


async def test_max_completion_tokens_wins_over_max_tokens(client, engine):
    body = {"messages": MESSAGES, "max_tokens": 9, "max_completion_tokens": 2}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.json()["usage"]["completion_tokens"] == 2


async def test_default_max_tokens_fills_the_context(client, engine):
    r = await client.post("/v1/chat/completions", json={"messages": MESSAGES})
    usage = r.json()["usage"]
    assert usage["total_tokens"] == engine.max_model_len


async def test_streaming_role_first_then_content_then_usage(client):
    body = {"messages": MESSAGES, "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    r = await client.post("/v1/chat/completions", json=body)
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    for e in events[:-1]:
        assert e["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = events[1:-2]
    assert [e["choices"][0]["delta"] for e in content] == [
        {"content": "a"}, {"content": "b"}, {"content": "c"}
    ]  # fmt: skip
    assert [e["choices"][0]["finish_reason"] for e in content] == [None, None, "length"]
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 3


async def test_content_parts_are_joined(client, engine):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                             {"type": "text", "text": "there"}]}]  # fmt: skip
    r = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
    assert r.status_code == 200, r.text
    ids = next(iter(engine.requests.values())).prompt_token_ids
    assert "Hi\nthere" in engine.tokenizer.decode(ids)


async def test_image_part_is_refused_with_the_param(client):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    r = await client.post("/v1/chat/completions", json={"messages": messages})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages.0.content"
    assert "image_url" in r.json()["error"]["message"]


async def test_logprobs_and_top_logprobs(client):
    body = {"messages": MESSAGES, "max_tokens": 2, "logprobs": True, "top_logprobs": 2}
    content = (await client.post("/v1/chat/completions", json=body)).json()["choices"][0][
        "logprobs"
    ]["content"]
    assert [c["token"] for c in content] == ["a", "b"]
    assert content[0]["logprob"] == -0.1 and content[0]["bytes"] == [97]
    assert [len(c["top_logprobs"]) for c in content] == [2, 2]
    assert content[0]["top_logprobs"][0] == {"token": "a", "logprob": -0.1, "bytes": [97]}


async def test_vllm_bench_serve_chat_body(client):
    """What vllm bench serve's openai-chat backend posts."""
    body = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Tell me"}]}],
        "temperature": 0.0,
        "max_completion_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    events = parse_sse((await client.post("/v1/chat/completions", json=body)).text)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    assert text == "abcde" and events[-2]["usage"]["completion_tokens"] == 5
