"""n > 1, best_of and batched prompts through the OpenAI server on a real colocated engine
(dummy tiny Llama): n choices with indices 0..n-1 (batched prompts: prompt-major), each
greedy choice equal to the n == 1 completion, usage counting every generated token,
per-index streaming deltas; the disaggregated engine serves n > 1 (child requests) with the
colocated engine's choices."""

from __future__ import annotations

import pytest

# The HTTP server's dependencies: absent on the GPU machine, where these tests skip.
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from distserve_rt.config import DisaggConfig
from distserve_rt.engine.async_llm import AsyncLLM
from distserve_rt.entrypoints.openai import build_app
from tests.engine.disagg_helpers import PROMPTS, engine_config
from tests.entrypoints.conftest import make_client, parse_sse

pytestmark = pytest.mark.anyio
GREEDY = {"max_tokens": 5, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def llm():
    llm = AsyncLLM.from_config(engine_config(), "colocated", model_name="tiny")
    yield llm
    llm.shutdown()


@pytest.fixture
async def client(llm):
    async with make_client(build_app(llm)) as c:
        yield c


async def complete(client, **body) -> dict:
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def test_completions_n_returns_n_indexed_choices_with_usage(client):
    single = await complete(client, prompt=PROMPTS[1], **GREEDY)
    body = await complete(client, prompt=PROMPTS[1], n=3, **GREEDY)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    # Greedy: n copies of the single completion (vLLM's behaviour).
    assert {c["text"] for c in body["choices"]} == {single["choices"][0]["text"]}
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(PROMPTS[1])
    assert usage["completion_tokens"] == 3 * 5 and usage["total_tokens"] == len(PROMPTS[1]) + 15


async def test_seeded_n_choices_differ_and_best_of_returns_n(client):
    sampled = {"max_tokens": 6, "temperature": 1.0, "seed": 11, "ignore_eos": True}
    body = await complete(client, prompt=PROMPTS[2], n=3, **sampled)
    again = await complete(client, prompt=PROMPTS[2], n=3, **sampled)
    texts = [c["text"] for c in body["choices"]]
    assert texts == [c["text"] for c in again["choices"]] and len(set(texts)) == 3
    best = await complete(client, prompt=PROMPTS[2], n=2, best_of=4, **sampled)
    assert [c["index"] for c in best["choices"]] == [0, 1]
    assert best["usage"]["completion_tokens"] == 2 * 6  # the returned choices' tokens


async def test_batched_prompts_are_indexed_prompt_major(client):
    singles = [await complete(client, prompt=p, **GREEDY) for p in PROMPTS[:3]]
    body = await complete(client, prompt=PROMPTS[:3], n=2, **GREEDY)
    assert [c["index"] for c in body["choices"]] == list(range(6))
    texts = [c["text"] for c in sorted(body["choices"], key=lambda c: c["index"])]
    assert texts == [s["choices"][0]["text"] for s in singles for _ in range(2)]
    usage = body["usage"]
    assert usage["prompt_tokens"] == sum(len(p) for p in PROMPTS[:3])
    assert usage["completion_tokens"] == 3 * 2 * 5


async def test_streamed_n_sends_per_index_deltas(client):
    r = await client.post(
        "/v1/completions",
        json={"prompt": PROMPTS[1], "n": 2, "stream": True,
              "stream_options": {"include_usage": True}, **GREEDY},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    texts, reasons = {0: "", 1: ""}, {}
    for event in events[:-2]:
        for choice in event["choices"]:
            texts[choice["index"]] += choice["text"]
            if choice["finish_reason"] is not None:
                reasons[choice["index"]] = choice["finish_reason"]
    single = await complete(client, prompt=PROMPTS[1], **GREEDY)
    assert texts == {0: single["choices"][0]["text"], 1: single["choices"][0]["text"]}
    assert reasons == {0: "length", 1: "length"}
    assert events[-2]["usage"]["completion_tokens"] == 10


async def test_chat_n_returns_n_choices(client):
    messages = [{"role": "user", "content": "hello there"}]
    r = await client.post("/v1/chat/completions", json={"messages": messages, "n": 2, **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["message"] == body["choices"][1]["message"]
    assert body["usage"]["completion_tokens"] == 10


async def test_streamed_best_of_above_n_is_a_400(client):
    r = await client.post(
        "/v1/completions", json={"prompt": "hi", "best_of": 3, "stream": True, **GREEDY}
    )
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "best_of"
    assert "best_of=3 > n=1 cannot stream" in error["message"]


async def test_disaggregated_engine_serves_n_as_the_colocated_one(client):
    body = {"prompt": PROMPTS[2], "n": 2, "max_tokens": 5, "temperature": 1.0, "seed": 3}
    want = await complete(client, **body)
    llm = AsyncLLM.from_config(
        engine_config(), "disaggregated", DisaggConfig(launcher="thread"), model_name="tiny"
    )
    try:
        async with make_client(build_app(llm)) as disagg:
            got = await complete(disagg, **body)
    finally:
        llm.shutdown()
    assert [c["index"] for c in got["choices"]] == [0, 1]
    assert [c["text"] for c in got["choices"]] == [c["text"] for c in want["choices"]]
    assert got["usage"] == want["usage"]


async def test_streamed_chat_n_starts_every_choice_and_sends_its_deltas(client):
    messages = [{"role": "user", "content": "hello there"}]
    body = {"messages": messages, "n": 2, "stream": True, **GREEDY}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    events = parse_sse(r.text)[:-1]
    assert [c["delta"]["role"] for c in events[0]["choices"]] == ["assistant", "assistant"]
    texts, reasons = {0: "", 1: ""}, {}
    for event in events[1:]:
        for choice in event["choices"]:
            texts[choice["index"]] += choice["delta"]["content"]
            if choice["finish_reason"] is not None:
                reasons[choice["index"]] = choice["finish_reason"]
    full = await client.post("/v1/chat/completions", json={"messages": messages, **GREEDY})
    want = full.json()["choices"][0]["message"]["content"]
    assert texts == {0: want, 1: want} and reasons == {0: "length", 1: "length"}
