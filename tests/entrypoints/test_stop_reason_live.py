"""stop_reason on a live server (AsyncLLM over dummy:llama-tiny, both placements), as vLLM
fills it: the matched stop string or stop token id when one ended the choice, None when
the length limit (or EOS) did; in completions and chat, streamed and not."""

from __future__ import annotations

import pytest

# The HTTP server's dependencies: absent on the GPU machine, where these tests skip.
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from distserve_rt.config import DisaggConfig
from distserve_rt.engine.async_llm import AsyncLLM
from distserve_rt.entrypoints.openai import build_app
from distserve_rt.sampling_params import SamplingParams
from tests.engine.disagg_helpers import engine_config
from tests.entrypoints.conftest import make_client, parse_sse

pytestmark = pytest.mark.anyio

PROMPT = "Hello there"
MESSAGES = [{"role": "user", "content": PROMPT}]


async def _reference(llm: AsyncLLM, prompt_ids: list[int]):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    async for out in llm.generate({"prompt_token_ids": prompt_ids}, params, "reference"):
        final = out
    return final.outputs[0]


async def _finish(client, route: str, body: dict) -> tuple[str, str, object]:
    """(text, finish_reason, stop_reason) of the one choice, streamed or not."""
    r = await client.post(route, json=body)
    assert r.status_code == 200, r.text
    if not body.get("stream"):
        choice = r.json()["choices"][0]
        text = choice["text"] if "text" in choice else choice["message"]["content"]
        return text, choice["finish_reason"], choice["stop_reason"]
    chunks = [e for e in parse_sse(r.text) if e != "[DONE]"]
    text = ""
    for chunk in chunks[:-1]:  # every chunk before the last: no reason yet
        for choice in chunk["choices"]:
            assert choice["finish_reason"] is None and choice["stop_reason"] is None
    for chunk in chunks:
        for choice in chunk["choices"]:
            text += choice.get("text") or choice.get("delta", {}).get("content") or ""
    (last,) = chunks[-1]["choices"]
    return text, last["finish_reason"], last["stop_reason"]


@pytest.mark.parametrize("placement", ["colocated", "disaggregated"])
async def test_stop_reason_is_the_matched_stop_string_or_token(placement):
    llm = AsyncLLM.from_config(
        engine_config(), placement, DisaggConfig(launcher="thread"), model_name="tiny"
    )
    try:
        tok = llm.tokenizer
        routes = {
            "/v1/completions": ({"prompt": PROMPT}, tok.encode(PROMPT)),
            "/v1/chat/completions": (
                {"messages": MESSAGES},
                tok.encode(tok.apply_chat_template(MESSAGES), add_special_tokens=False),
            ),
        }
        async with make_client(build_app(llm)) as client:
            for route, (prompt_fields, prompt_ids) in routes.items():
                ref = await _reference(llm, prompt_ids)
                stop_token = ref.token_ids[4]
                # A stop string that ends inside the output: the text is cut before it.
                stop_str = next(
                    ref.text[i : i + 2] for i in range(1, len(ref.text) - 1)
                    if ref.text[i : i + 2].strip()
                )  # fmt: skip
                cut = ref.text[: ref.text.find(stop_str)]
                base = prompt_fields | {"max_tokens": 12, "temperature": 0, "ignore_eos": True}
                for stream in (False, True):
                    body = base | {"stream": stream}
                    got = await _finish(client, route, body | {"stop": ["@@@", stop_str]})
                    assert got == (cut, "stop", stop_str), (route, stream)
                    got = await _finish(client, route, body | {"stop_token_ids": [stop_token]})
                    first = ref.token_ids.index(stop_token)
                    assert got[1:] == ("stop", stop_token), (route, stream)
                    assert got[0] == tok.decode(ref.token_ids[:first]), (route, stream)
                    got = await _finish(client, route, body)
                    assert got == (ref.text, "length", None), (route, stream)
    finally:
        llm.shutdown()
