"""vLLM's /tokenize, /detokenize, /version, /ping and /docs (+ /openapi.json) on the
server over the fake engine (a byte tokenizer: id = byte + 3, BOS 1)."""

from __future__ import annotations

import pytest

# The HTTP server's dependencies: absent on the GPU machine, where these tests skip.
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import distserve_rt
from distserve_rt.entrypoints.openai import build_app
from tests.entrypoints.conftest import make_client

pytestmark = pytest.mark.anyio


async def test_tokenize_a_prompt_adds_bos_like_completions(client, engine):
    r = await client.post("/tokenize", json={"model": "fake-model", "prompt": "Hi"})
    assert r.status_code == 200, r.text
    ids = engine.tokenizer.encode("Hi")
    assert ids[0] == engine.tokenizer.bos_token_id
    assert r.json() == {"count": 3, "max_model_len": 128, "tokens": ids, "token_strs": None}
    r = await client.post(
        "/tokenize", json={"prompt": "Hi", "add_special_tokens": False, "return_token_strs": True}
    )
    assert r.json()["tokens"] == ids[1:] and r.json()["token_strs"] == ["H", "i"]


async def test_tokenize_messages_renders_the_chat_template_as_chat_does(client, engine):
    messages = [{"role": "user", "content": "Hello"}]
    r = await client.post("/tokenize", json={"messages": messages})
    assert r.status_code == 200, r.text
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert r.json()["tokens"] == engine.tokenizer.encode(text, add_special_tokens=False)
    r2 = await client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False})
    assert r2.json()["count"] < r.json()["count"]
    # The same prompt reaches the engine through /v1/chat/completions.
    await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
    (submitted,) = engine.requests.values()
    assert submitted.prompt_token_ids == r.json()["tokens"]


async def test_detokenize_round_trips(client, engine):
    ids = engine.tokenizer.encode("Hi there", add_special_tokens=False)
    r = await client.post("/detokenize", json={"model": "fake-model", "tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": "Hi there"}
    assert (await client.post("/detokenize", json={"tokens": []})).json() == {"prompt": ""}


@pytest.mark.parametrize(
    ("route", "body", "param", "message"),
    [
        ("/tokenize", {}, "prompt", "send exactly one of 'prompt' (text) and 'messages'"),
        (
            "/tokenize",
            {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
            "prompt",
            "got both",
        ),  # fmt: skip
        ("/tokenize", {"messages": []}, "messages", "messages is empty"),
        ("/tokenize", {"prompt": 5}, "prompt", "valid string"),
        ("/tokenize", {"prompt": "a", "model": "gpt-9"}, "model", "does not exist"),
        ("/detokenize", {}, "tokens", "Field required"),
        ("/detokenize", {"tokens": ["a"]}, "tokens.0", "valid integer"),
        ("/detokenize", {"tokens": [5.0]}, "tokens.0", "valid integer"),
        ("/detokenize", {"tokens": "abc"}, "tokens", "valid list"),
        (
            "/detokenize",
            {"tokens": [5, 512]},
            "tokens",
            "tokens[1] = 512 is not a token id in [0, 512)",
        ),  # fmt: skip
        ("/detokenize", {"tokens": [-1]}, "tokens", "tokens[0] = -1 is not a token id"),
    ],
)
async def test_bad_input_is_a_400_in_vllms_error_shape(client, route, body, param, message):
    r = await client.post(route, json=body)
    assert r.status_code in (400, 404), r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == r.status_code and error["param"] == param
    assert message in error["message"], error["message"]
    assert "\n" not in error["message"]


async def test_version_ping_docs_and_openapi(client, engine):
    assert (await client.get("/version")).json() == {"version": distserve_rt.__version__}
    assert (await client.get("/ping")).status_code == 200
    assert (await client.post("/ping")).status_code == 200
    docs = await client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    schema = (await client.get("/openapi.json")).json()
    for path in ("/tokenize", "/detokenize", "/version", "/ping", "/v1/completions"):
        assert path in schema["paths"], path
    engine.dead = True
    r = await client.get("/ping")
    assert r.status_code == 503 and "engine is dead" in r.json()["error"]["message"]


async def test_api_key_leaves_tokenize_and_probes_open_as_vllm_does(engine):
    async with make_client(build_app(engine, api_key="k")) as c:
        assert (await c.post("/tokenize", json={"prompt": "a"})).status_code == 200
        assert (await c.get("/ping")).status_code == 200
        assert (await c.get("/v1/models")).status_code == 401
