"""Issue 13's scenario through the OpenAI server, colocated and disaggregated: poison
completions (seed 2**64, prompt "", token ids past the vocabulary, one whose engine step
fails) sent concurrently with innocent ones. Every innocent request gets 200 and the
completion it gets alone; every poison gets a 400 naming the field, or its own 500 — zero
collateral failures. A seed in the upper half of the 64-bit range is not a poison."""

from __future__ import annotations

import anyio
import pytest

# The HTTP server's dependencies: absent on the GPU machine, where these tests skip.
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from distserve_rt.config import DisaggConfig
from distserve_rt.engine.async_llm import AsyncLLM
from distserve_rt.entrypoints.openai import build_app
from distserve_rt.worker.executor import UniprocExecutor
from tests.engine.disagg_helpers import PROMPTS, engine_config
from tests.entrypoints.conftest import make_client

FAILING_PROMPT = [7, 7, 7, 7, 7, 7, 7]
"""The engine step fails whenever it computes a row of a request with this prompt."""


def _innocent(i: int) -> dict:
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 6, "ignore_eos": True}
    if i % 2:
        return body | {"temperature": 0.8, "seed": 1000 + i}
    return body | {"temperature": 0}


def _poisons(vocab_size: int) -> dict[str, tuple[dict, int, str]]:
    """name -> (body, expected status, text the error message contains)."""
    base = {"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0.8}
    return {
        "seed 2**64": (base | {"seed": 2**64}, 400, "seed must be in [0, 2**64 - 1]"),
        "empty prompt": (base | {"prompt": ""}, 400, "prompt is an empty string"),
        "token past the vocab": (
            base | {"prompt": [3, vocab_size + 5]},
            400,
            f"is not a token id in [0, {vocab_size})",
        ),
        "failing step": (
            base | {"prompt": FAILING_PROMPT},
            500,
            "failed the engine step on its own: RuntimeError: device fault",
        ),
    }


def _fail_on_prompt(execute):
    def execute_or_fail(self, scheduler_output):
        rows = [p.request for p in scheduler_output.prefills] + scheduler_output.decodes
        if any(r.prompt_token_ids == FAILING_PROMPT for r in rows):
            raise RuntimeError("device fault")
        return execute(self, scheduler_output)

    return execute_or_fail


async def _post_all(client, bodies: dict[str, dict]) -> dict[str, tuple[int, dict]]:
    results: dict[str, tuple[int, dict]] = {}

    async def post(name: str, body: dict) -> None:
        response = await client.post("/v1/completions", json=body | {"model": "tiny"})
        results[name] = (response.status_code, response.json())

    async with anyio.create_task_group() as tg:
        for name, body in bodies.items():
            tg.start_soon(post, name, body)
    return results


@pytest.mark.anyio
@pytest.mark.parametrize("placement", ["colocated", "disaggregated"])
async def test_poison_requests_fail_alone_through_the_server(placement, monkeypatch):
    llm = AsyncLLM.from_config(
        engine_config(), placement, DisaggConfig(launcher="thread"), model_name="tiny"
    )
    try:
        async with make_client(build_app(llm)) as client:
            innocents = {f"innocent {i}": _innocent(i) for i in range(8)}
            innocents["seed 2**63+5"] = _innocent(1) | {"seed": 2**63 + 5}
            alone = {}
            for name, body in innocents.items():  # one at a time: the reference
                alone |= await _post_all(client, {name: body})
            monkeypatch.setattr(
                UniprocExecutor, "execute", _fail_on_prompt(UniprocExecutor.execute)
            )
            poisons = _poisons(llm.tokenizer.vocab_size)
            bodies = innocents | {name: body for name, (body, _, _) in poisons.items()}
            results = await _post_all(client, bodies)
    finally:
        llm.shutdown()

    for name, (_body, status, message) in poisons.items():
        got_status, got = results[name]
        assert (got_status, name) == (status, name), got
        assert message in got["error"]["message"], (name, got)
    for name in innocents:
        status, got = results[name]
        assert status == 200, (name, got)
        assert alone[name][0] == 200, (name, alone[name])
        want = alone[name][1]["choices"][0]
        assert got["choices"][0]["text"] == want["text"], name
        assert got["choices"][0]["finish_reason"] == want["finish_reason"] == "length", name
