"""`LLM` end to end on the dummy tiny presets (real Llama and OPT code, random weights):
greedy outputs equal a cache-free loop under both policies, several chunk budgets and a KV
pool small enough to preempt; text in, text out."""

from __future__ import annotations

import pytest

from distserve_rt import LLM, SamplingParams
from distserve_rt.engine import EngineConfig, LLMEngine
from distserve_rt.models import load_model
from distserve_rt.tokenizer import get_tokenizer
from tests.engine.fakes import reference_greedy

PROMPTS = [[3 + (7 * i + 5 * j) % 500 for j in range(4 + 5 * i)] for i in range(5)]
MAX_TOKENS = 10


@pytest.fixture(scope="module", params=["dummy:llama-tiny", "dummy:opt-tiny"])
def tiny(request):
    model, config = load_model(request.param, dtype="float32")
    reference = [reference_greedy(model, p, MAX_TOKENS) for p in PROMPTS]
    return request.param, model, reference


@pytest.mark.parametrize(
    ("policy", "budget", "num_blocks"),
    [
        ("continuous_batching", None, 256),
        ("continuous_batching", None, 6),  # preemption by recompute
        ("chunked_prefill", 8, 256),
        ("chunked_prefill", 13, 6),  # chunks and preemption together
    ],
)
def test_greedy_equals_cache_free_loop(tiny, policy, budget, num_blocks):
    name, model, reference = tiny
    c = model.config
    block_bytes = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 8 * 4  # block 8, fp32
    config = EngineConfig(
        model=name,
        policy=policy,
        block_size=8,
        max_num_seqs=4,
        max_num_batched_tokens=budget,
        max_model_len=256,
        kv_cache_memory_bytes=num_blocks * block_bytes,
        log_stats_interval_s=0,
    )
    llm = LLM.from_engine(LLMEngine(config, model=model))
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    assert (sum(o.metrics.num_preemptions for o in outputs) > 0) == (num_blocks == 6)


def test_text_in_text_out():
    llm = LLM("dummy:llama-tiny", kv_cache_memory_bytes=16 << 20, log_stats_interval_s=0)
    tokenizer = get_tokenizer("dummy:llama-tiny")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = llm.generate(["Hello, world", "Paged attention"], params, use_tqdm=False)
    assert [o.prompt for o in outputs] == ["Hello, world", "Paged attention"]
    for out in outputs:
        c = out.outputs[0]
        assert out.prompt_token_ids == tokenizer.encode(out.prompt)
        assert len(c.token_ids) == 6 and c.finish_reason == "length"
        assert c.text == tokenizer.decode(c.token_ids)
        assert out.metrics.ttft > 0 and out.metrics.tpot > 0
    with pytest.raises(ValueError, match=r"prompts\[1\] is an empty string"):
        llm.generate(["ok", ""], use_tqdm=False)
