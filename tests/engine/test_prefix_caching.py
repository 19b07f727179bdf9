"""Automatic prefix caching end to end on the colocated engine: the tokens are the same with
the cache on and off (greedy and seeded, both policies), for prompts sharing a long prefix
and the same prompt twice, with a pool small enough to preempt and to evict cached blocks;
and the cache really is used (hits counted)."""

from __future__ import annotations

import pytest

from distserve_rt import LLM, SamplingParams
from distserve_rt.engine import EngineConfig, LLMEngine
from distserve_rt.models import load_model
from tests.engine.fakes import FakeCausalLM, reference_greedy

MODEL = FakeCausalLM()
BLOCK_BYTES = 2 * 2 * 1 * 8 * 16 * 4  # layers * (K, V) * kv heads * block_size 8 * head_dim * fp32
SYSTEM = [5 + (7 * i) % 53 for i in range(37)]  # a shared "system prompt": 4 full blocks + 5
PROMPTS = [
    SYSTEM + [11, 12, 13],
    SYSTEM + [21, 22],
    SYSTEM + [11, 12, 13],  # the same prompt twice
    [40, 41, 42, 43] * 5,  # unrelated
    SYSTEM[:24],  # a prompt that is all full blocks of another's
]
MAX_TOKENS = 14


def make_engine(caching: bool, policy: str, num_blocks: int, budget: int | None):
    config = EngineConfig(
        model="fake",
        policy=policy,
        block_size=8,
        max_num_batched_tokens=budget,
        max_num_seqs=2,  # later prompts are admitted after earlier ones ran: they can hit
        kv_cache_memory_bytes=num_blocks * BLOCK_BYTES,
        log_stats_interval_s=0,
        enable_prefix_caching=caching,
    )
    return LLMEngine(config, model=MODEL)


def two_rounds(engine: LLMEngine, params) -> list[list[int]]:
    """The prompts, then the same prompts again (a second turn: all of them may hit)."""
    llm = LLM.from_engine(engine)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    outputs = []
    for _ in range(2):
        outs = llm.generate(prompts, params, use_tqdm=False)
        outputs += [o.outputs[0].token_ids for o in outs]
        outputs.append([sum(o.metrics.num_preemptions for o in outs)])
    return outputs


CASES = [
    ("continuous_batching", None, 64),
    ("continuous_batching", None, 10),  # preemption by recompute, eviction
    ("chunked_prefill", 5, 64),
    ("chunked_prefill", 16, 10),  # chunks, preemption and eviction together
]


@pytest.mark.parametrize(("policy", "budget", "num_blocks"), CASES)
def test_greedy_tokens_are_the_same_with_and_without_the_cache(policy, budget, num_blocks):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    cached = make_engine(True, policy, num_blocks, budget)
    with_cache = two_rounds(cached, params)
    without = two_rounds(make_engine(False, policy, num_blocks, budget), params)
    reference = [MODEL.reference_greedy(p, MAX_TOKENS) for p in PROMPTS]
    assert with_cache[:5] == with_cache[6:11] == reference
    assert without[:5] == reference
    stats = cached.block_manager.stats()
    # Round 1: the twin prompt and SYSTEM[:24] hit SYSTEM's blocks; round 2 hits more.
    assert stats.prefix_cache_hits >= 5 * 8 * 3
    preempted = with_cache[5][0] + with_cache[11][0]
    assert (preempted > 0) == (num_blocks == 10)
    if num_blocks == 10:
        # 10 blocks cannot hold every prompt's blocks: some cached ones were evicted.
        assert cached.block_manager.num_cached_blocks < 5 + 5 + 3 + 2 + 3


@pytest.mark.parametrize(("policy", "budget", "num_blocks"), [CASES[1], CASES[3]])
def test_seeded_tokens_are_the_same_with_and_without_the_cache(policy, budget, num_blocks):
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=100 + i, max_tokens=10, ignore_eos=True)
        for i in range(len(PROMPTS))
    ]
    cached = make_engine(True, policy, num_blocks, budget)
    with_cache = two_rounds(cached, params)
    without = two_rounds(make_engine(False, policy, num_blocks, budget), params)
    assert with_cache[:5] == without[:5] == with_cache[6:11] == without[6:11]
    assert cached.block_manager.stats().prefix_cache_hits > 0


def test_flag_validation():
    with pytest.raises(ValueError, match="enable_prefix_caching must be True or False, got 'no'"):
        EngineConfig(enable_prefix_caching="no")
    assert EngineConfig().enable_prefix_caching  # on by default, as in vLLM


@pytest.mark.parametrize("policy", ["continuous_batching", "chunked_prefill"])
def test_real_model_reads_the_cached_prefix(policy):
    """Llama code (rotary positions, GQA) on the cached-prefix path: a prompt whose first
    blocks are cached gives the tokens the cache-free loop gives."""
    model, _ = load_model("dummy:llama-tiny", dtype="float32")
    prompts = [[3 + (5 * i) % 300 for i in range(40)], [3 + (5 * i) % 300 for i in range(35)]]
    reference = [reference_greedy(model, p, 8) for p in prompts]
    config = EngineConfig(
        model="dummy:llama-tiny",
        policy=policy,
        block_size=8,
        max_num_seqs=1,  # the second prompt is admitted after the first ran: it hits
        max_model_len=128,
        kv_cache_memory_bytes=1 << 20,
        log_stats_interval_s=0,
    )
    engine = LLMEngine(config, model=model)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = LLM.from_engine(engine).generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False
    )
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert engine.block_manager.stats().prefix_cache_hits == 4 * 8
