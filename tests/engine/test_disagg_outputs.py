"""What the disaggregated controller returns besides token ids equals the colocated engine's:
stop strings (cut text, include_stop_str_in_output, streaming hold-back), logprobs of every
token including the first (computed by prefill), and seeded sampling (the generator state
migrates with the KV). Instances run on threads (real shm transfers)."""

from __future__ import annotations

import pytest

from distserve_rt.config import DisaggConfig
from distserve_rt.engine.controller import Controller
from distserve_rt.engine.core import make_engine_core
from distserve_rt.engine.llm_engine import LLMEngine
from distserve_rt.outputs import RequestOutput
from distserve_rt.sampling_params import SamplingParams
from tests.engine.disagg_helpers import PROMPTS, engine_config, kv_idle, settle

# Found in the greedy texts of PROMPTS on dummy:llama-tiny (byte tokenizer): requests 2, 3
# and 4 stop at one of them after several tokens, 0 and 1 run to max_tokens.
STOPS = ["l5", "|t", "PF"]


@pytest.fixture(scope="module")
def colocated():
    engine = make_engine_core(engine_config())
    assert isinstance(engine, LLMEngine) and engine.tokenizer is not None
    return engine


@pytest.fixture(scope="module")
def controller():
    c = make_engine_core(engine_config(), "disaggregated", DisaggConfig(launcher="thread"))
    assert isinstance(c, Controller) and c.tokenizer is not None
    yield c
    c.shutdown()


def _run(engine, params: list[SamplingParams]) -> dict[str, list[RequestOutput]]:
    """Every output (streamed and final) of each request, in order."""
    outputs: dict[str, list[RequestOutput]] = {str(i): [] for i in range(len(params))}
    for i, (prompt, p) in enumerate(zip(PROMPTS[: len(params)], params, strict=True)):
        engine.add_request(str(i), prompt, p, stream=True)
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            return outputs
        for out in engine.step():
            outputs[out.request_id].append(out)
    raise AssertionError(f"not finished: {outputs}")


def _summary(outputs: list[RequestOutput]):
    final = outputs[-1].outputs[0]
    assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
    streamed = [o.outputs[0].text for o in outputs]
    return final.token_ids, final.text, final.finish_reason, final.stop_reason, streamed


@pytest.mark.parametrize("include_stop", [False, True])
def test_stop_strings_cut_text_and_stream_like_colocated(colocated, controller, include_stop):
    params = [
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=STOPS,
                       include_stop_str_in_output=include_stop)
        for _ in PROMPTS
    ]  # fmt: skip
    expected = {k: _summary(v) for k, v in _run(colocated, params).items()}
    got = {k: _summary(v) for k, v in _run(controller, params).items()}
    assert got == expected
    stopped = [k for k, v in expected.items() if v[3] in STOPS]
    assert len(stopped) >= 2  # the test exercises stop strings, not only max_tokens
    for k in stopped:
        token_ids, text, _, stop, streamed = got[k]
        assert len(token_ids) < 16 and text.endswith(stop) == include_stop
        # hold-back: no streamed text ever showed the stop string or text after it
        assert all(text.startswith(s) for s in streamed)
    settle(controller, lambda: kv_idle(controller))  # the stopped requests' KV was freed


def test_logprobs_of_every_token_equal_colocated(colocated, controller):
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)] * 3
    expected = {k: v[-1].outputs[0] for k, v in _run(colocated, params).items()}
    got = {k: v[-1].outputs[0] for k, v in _run(controller, params).items()}
    for k, want in expected.items():
        assert got[k].token_ids == want.token_ids
        assert len(got[k].logprobs) == len(want.token_ids) == 6  # the first token's included
        for row, want_row in zip(got[k].logprobs, want.logprobs, strict=True):
            assert row.keys() == want_row.keys() and len(row) >= 3
            assert [lp.logprob for lp in row.values()] == pytest.approx(
                [lp.logprob for lp in want_row.values()], abs=1e-4
            )


def test_seeded_sampling_equals_colocated(colocated, controller):
    params = [
        SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, ignore_eos=True, seed=100 + i)
        for i in range(len(PROMPTS))
    ]
    expected = {k: v[-1].outputs[0].token_ids for k, v in _run(colocated, params).items()}
    got = {k: v[-1].outputs[0].token_ids for k, v in _run(controller, params).items()}
    assert got == expected
    # not greedy: another seed changes the tokens (so the equality above is not trivial)
    greedy = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * len(PROMPTS)
    greedy_ids = {k: v[-1].outputs[0].token_ids for k, v in _run(colocated, greedy).items()}
    assert greedy_ids != expected
