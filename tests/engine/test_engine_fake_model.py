"""The engine end to end on a fake model that really uses the paged KV cache: greedy tokens
equal a cache-free one-request-at-a-time loop under every policy, chunk budget and KV pool
size (preemption included); lifecycle events and input errors."""

from __future__ import annotations

import pytest

from distserve_rt import LLM, SamplingParams
from distserve_rt.core.request import RequestEventType
from distserve_rt.engine import EngineConfig, LLMEngine
from tests.engine.fakes import FakeCausalLM

MODEL = FakeCausalLM()
BLOCK_BYTES = 2 * 2 * 1 * 8 * 16 * 4  # layers * (K, V) * kv heads * block_size 8 * head_dim * fp32
PROMPTS = [[5 + i, 7, 9 + (i * 3) % 50, 11, 13][: 2 + i % 4] * (1 + i % 3) for i in range(7)]
MAX_TOKENS = 14


@pytest.fixture(scope="module")
def reference():
    return [MODEL.reference_greedy(p, MAX_TOKENS) for p in PROMPTS]


def make_llm(policy="continuous_batching", budget=None, num_blocks=64, max_num_seqs=4):
    config = EngineConfig(
        model="fake",
        policy=policy,
        block_size=8,
        max_num_batched_tokens=budget,
        max_num_seqs=max_num_seqs,
        kv_cache_memory_bytes=num_blocks * BLOCK_BYTES,
        log_stats_interval_s=0,
    )
    return LLM.from_engine(LLMEngine(config, model=MODEL))


def generate(llm, **kwargs):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, **kwargs)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    return llm.generate(prompts, params, use_tqdm=False)


@pytest.mark.parametrize(
    ("policy", "budget", "num_blocks"),
    [
        ("continuous_batching", None, 64),
        ("continuous_batching", None, 7),  # preemption by recompute
        ("chunked_prefill", 4, 64),
        ("chunked_prefill", 7, 64),
        ("chunked_prefill", 16, 64),
        ("chunked_prefill", 5, 7),  # chunks and preemption together
    ],
)
def test_greedy_equals_reference(policy, budget, num_blocks, reference):
    llm = make_llm(policy, budget, num_blocks)
    outputs = generate(llm)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    assert [o.prompt_token_ids for o in outputs] == PROMPTS
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outputs)
    preemptions = sum(o.metrics.num_preemptions for o in outputs)
    assert (preemptions > 0) == (num_blocks == 7)
    assert llm.llm_engine.block_manager.num_used_blocks == 0


def test_lifecycle_events_and_metrics():
    llm = make_llm("chunked_prefill", 4, 7)
    outputs = generate(llm)
    engine = llm.llm_engine
    for out in outputs:
        m = out.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time
        assert m.first_token_time <= m.last_token_time <= m.finished_time
        assert m.ttft > 0 and m.tpot > 0 and m.e2e_latency >= m.ttft
        assert m.time_in_queue >= 0
    # The event list of a request, rebuilt from a fresh run with a kept Request.
    request = engine.add_request("x", PROMPTS[0], SamplingParams(temperature=0, max_tokens=5))
    while engine.has_unfinished_requests():
        engine.step()
    events = request.events()
    kinds = [e for e, _ in events]
    times = [t for _, t in events]
    assert times == sorted(times)
    assert kinds[:2] == [RequestEventType.ARRIVED, RequestEventType.SCHEDULED]
    assert kinds.count(RequestEventType.TOKEN) == 5 and kinds[-1] is RequestEventType.FINISHED
    assert len(request.itl) == 4 and all(x >= 0 for x in request.itl)


def test_eos_stop_token_and_min_tokens(reference):
    llm = make_llm()
    stop = reference[0][3]
    first = reference[0].index(stop)
    (out,) = llm.generate(
        {"prompt_token_ids": PROMPTS[0]},
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[stop]),
        use_tqdm=False,
    )
    c = out.outputs[0]
    assert c.token_ids == reference[0][: first + 1]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    params = SamplingParams(
        temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[stop], min_tokens=first + 2
    )
    (out,) = llm.generate({"prompt_token_ids": PROMPTS[0]}, params, use_tqdm=False)
    assert len(out.outputs[0].token_ids) > first + 1


def test_streaming_outputs_and_abort():
    engine = make_llm().llm_engine
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine.add_request("s", PROMPTS[1], params, stream=True)
    engine.add_request("q", PROMPTS[2], params)
    seen = []
    for _ in range(3):
        seen += [(o.request_id, len(o.outputs[0].token_ids), o.finished) for o in engine.step()]
    assert seen == [("s", 1, False), ("s", 2, False), ("s", 3, False)]
    assert engine.abort_request("q") and not engine.abort_request("nope")
    (out,) = [o for o in engine.step() if o.request_id == "q"]
    assert out.finished and out.outputs[0].finish_reason == "abort"


def test_invalid_inputs():
    llm = make_llm()
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        llm.generate([{"prompt_token_ids": [1]}, {"prompt_token_ids": []}], use_tqdm=False)
    with pytest.raises(ValueError, match=r"prompts\[0\].*\[0, 64\)"):
        llm.generate([{"prompt_token_ids": [1, 64]}], use_tqdm=False)
    with pytest.raises(ValueError, match=r"prompts\[0\] must be a str"):
        llm.generate([3], use_tqdm=False)
    with pytest.raises(ValueError, match="2 entries for 1 prompts"):
        llm.generate([{"prompt_token_ids": [1]}], [SamplingParams()] * 2, use_tqdm=False)
    with pytest.raises(ValueError, match="policy"):
        EngineConfig(policy="round_robin")
    with pytest.raises(ValueError, match="tensor_parallel_size must be an int >= 1, got 0"):
        EngineConfig(tensor_parallel_size=0)
    # A prompt the context can never hold finishes with an error; the others still run.
    long_prompt = {"prompt_token_ids": [3] * 256}
    params = SamplingParams(temperature=0, max_tokens=2)
    bad, good = llm.generate([long_prompt, {"prompt_token_ids": [4, 5]}], params, use_tqdm=False)
    assert bad.outputs[0].finish_reason == "error" and "max_model_len" in bad.error
    assert good.outputs[0].finish_reason == "length" and len(good.outputs[0].token_ids) == 2


def test_seeded_sampling_is_batch_and_preemption_independent():
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=100 + i, max_tokens=10, ignore_eos=True)
        for i in range(len(PROMPTS))
    ]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    runs = []
    for policy, budget, num_blocks in [
        ("continuous_batching", None, 64),
        ("continuous_batching", None, 7),
        ("chunked_prefill", 5, 7),
    ]:
        outs = make_llm(policy, budget, num_blocks).generate(prompts, params, use_tqdm=False)
        runs.append([o.outputs[0].token_ids for o in outs])
    alone = [
        make_llm().generate(p, sp, use_tqdm=False)[0].outputs[0].token_ids
        for p, sp in zip(prompts, params, strict=True)
    ]
    assert runs[0] == runs[1] == runs[2] == alone


def test_logprobs_per_token():
    llm = make_llm()
    params = SamplingParams(temperature=0, max_tokens=3, logprobs=2, ignore_eos=True)
    (out,) = llm.generate({"prompt_token_ids": PROMPTS[0]}, params, use_tqdm=False)
    c = out.outputs[0]
    assert len(c.logprobs) == 3
    for token, row in zip(c.token_ids, c.logprobs, strict=True):
        assert token in row and len(row) == 2  # greedy: the sampled token is the top one
        values = [lp.logprob for lp in row.values()]
        assert row[token].logprob == max(values) and all(v <= 0 for v in values)
        assert row[token].rank == 1 and sorted(lp.rank for lp in row.values()) == [1, 2]


def test_periodic_stats_line(caplog):
    llm = make_llm()
    llm.llm_engine._stats._interval_s = 1e-9  # every step
    with caplog.at_level("INFO", logger="distserve_rt"):
        generate(llm)
    lines = [r.getMessage() for r in caplog.records if "tok/s" in r.getMessage()]
    assert lines and "running" in lines[-1] and "KV usage" in lines[-1]
