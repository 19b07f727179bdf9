"""TP and PP in real worker processes (gloo on CPU) give the tokens of TP = PP = 1.

One executor per (model, tp, pp) is started once and reused by an engine per policy, so
the spawn cost is paid once. Chunked prefill with a small budget makes steps that mix
prefill chunks and decodes cross the stages; PP = 2 must have had two batches in flight.
"""

from __future__ import annotations

import os
import signal

import pytest

from distserve_rt import LLM, SamplingParams
from distserve_rt.distributed.launch import WorkerFailedError
from distserve_rt.engine import EngineConfig, LLMEngine
from distserve_rt.worker.multiproc_executor import MultiprocExecutor

PROMPTS = [[3 + (7 * i + 5 * j) % 500 for j in range(4 + 6 * i)] for i in range(4)]
MAX_TOKENS = 6
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
POLICIES = [("continuous_batching", None), ("chunked_prefill", 8)]


def engine_config(model: str, policy: str, budget: int | None, tp: int = 1, pp: int = 1):
    return EngineConfig(
        model=model,
        dtype="float32",
        policy=policy,
        block_size=8,
        max_num_seqs=4,
        max_num_batched_tokens=budget,
        max_model_len=128,
        kv_cache_memory_bytes=4 << 20,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        log_stats_interval_s=0,
    )


def generate(engine: LLMEngine, params) -> list[tuple[list[int], list | None]]:
    llm = LLM.from_engine(engine)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outputs]


@pytest.fixture(scope="module")
def reference():
    """TP = PP = 1 outputs per (model, policy, params name), computed once."""
    cache: dict = {}

    def get(model: str, policy: str, budget: int | None, name: str, params) -> list:
        key = (model, policy, name)
        if key not in cache:
            engine = LLMEngine(engine_config(model, policy, budget))
            cache[key] = generate(engine, params)
        return cache[key]

    return get


@pytest.mark.parametrize(
    ("model", "tp", "pp"),
    [
        ("dummy:llama-tiny", 2, 1),
        ("dummy:llama-tiny", 1, 2),
        ("dummy:opt-tiny", 2, 1),
        ("dummy:opt-tiny", 1, 2),
        ("dummy:llama-tiny", 2, 2),
    ],
)
def test_greedy_equals_tp1(reference, model, tp, pp):
    executor = MultiprocExecutor(engine_config(model, "continuous_batching", None, tp, pp))
    try:
        for policy, budget in POLICIES:
            config = engine_config(model, policy, budget, tp, pp)
            got = generate(LLMEngine(config, executor=executor), GREEDY)
            assert got == reference(model, policy, budget, "greedy", GREEDY), (policy, tp, pp)
        # PP = k keeps k batches in flight (one per virtual engine); TP alone keeps one.
        assert executor.max_num_in_flight == pp
    finally:
        executor.shutdown()
    assert not any(p.is_alive() for p in executor.processes)


def test_seeded_sampling_and_logprobs_equal_tp1(reference):
    params = [
        SamplingParams(temperature=0.9, top_p=0.9, seed=100 + i, max_tokens=5, logprobs=2)
        for i in range(len(PROMPTS))
    ]
    model = "dummy:llama-tiny"
    expected = reference(model, "chunked_prefill", 8, "seeded", params)
    engine = LLMEngine(engine_config(model, "chunked_prefill", 8, pp=2))
    try:
        got = generate(engine, params)
    finally:
        engine.shutdown()
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]
    for (_, got_lp), (_, exp_lp) in zip(got, expected, strict=True):
        assert len(got_lp) == len(exp_lp) == 5
        for got_row, exp_row in zip(got_lp, exp_lp, strict=True):
            assert got_row.keys() == exp_row.keys()
            for token_id, logprob in exp_row.items():
                assert got_row[token_id].logprob == pytest.approx(logprob.logprob, abs=1e-4)


def test_killed_worker_fails_the_step_and_shuts_down():
    engine = LLMEngine(engine_config("dummy:llama-tiny", "continuous_batching", None, pp=2))
    processes = engine.executor.processes
    try:
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(str(i), prompt, GREEDY)
        engine.step()
        # Stage 0 dies: the sampling rank (stage 1) waits for activations that never come.
        os.kill(processes[0].pid, signal.SIGKILL)
        with pytest.raises(WorkerFailedError, match=r"worker [01] (exited|closed|raised)"):
            for _ in range(100):
                engine.step()
    finally:
        engine.shutdown()
    assert not any(p.is_alive() for p in processes)


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"tensor_parallel_size": 3}, r"tensor_parallel_size=3 must divide the model's num_heads"),
        ({"tensor_parallel_size": 4}, r"tensor_parallel_size=4 must divide the model's num_kv_h"),
        ({"pipeline_parallel_size": 5}, r"pipeline_parallel_size=5 exceeds the model's 4 layers"),
    ],
)
def test_bad_sizes_rejected_at_start_up(sizes, message):
    with pytest.raises(ValueError, match=message):
        LLMEngine(EngineConfig(model="dummy:llama-tiny", **sizes))
