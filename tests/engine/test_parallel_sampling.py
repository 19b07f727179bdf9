"""Parallel sampling (n > 1, best_of) on the colocated engine: the prompt is prefilled once
and its blocks are forked (shared, counted) until a sequence appends into the shared last
block, which is then copied (copy-on-write) without touching the other sequences' KV;
greedy sequences equal the single-sequence output, seeded ones are reproducible and
differ, best_of returns the top n by cumulative logprob, and blocks are conserved."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distserve_rt import LLM, SamplingParams
from distserve_rt.config import DisaggConfig
from distserve_rt.engine import EngineConfig, LLMEngine
from distserve_rt.engine.data_parallel import DataParallelCore
from distserve_rt.worker.executor import UniprocExecutor
from tests.engine.disagg_helpers import PROMPTS as TINY
from tests.engine.disagg_helpers import drain, engine_config
from tests.engine.fakes import FakeCausalLM, reference_greedy
from tests.engine.test_failure_isolation import POISON, PoisonExecutor

MODEL = FakeCausalLM()
BLOCK_BYTES = 2 * 2 * 1 * 8 * 16 * 4  # layers * (K, V) * kv heads * block_size 8 * head_dim * fp32
PROMPT = [5 + (7 * i) % 53 for i in range(21)]  # 2 full blocks of 8 + 5 tokens in a third
POLICIES = [("continuous_batching", None), ("chunked_prefill", 8)]


def make_engine(policy="continuous_batching", budget=None, num_blocks=64, caching=True, seqs=8):
    config = EngineConfig(
        model="fake",
        policy=policy,
        block_size=8,
        max_num_batched_tokens=budget,
        max_num_seqs=seqs,
        kv_cache_memory_bytes=num_blocks * BLOCK_BYTES,
        log_stats_interval_s=0,
        enable_prefix_caching=caching,
    )
    return LLMEngine(config, model=MODEL)


def generate(engine: LLMEngine, params: SamplingParams, prompt=PROMPT):
    [out] = LLM.from_engine(engine).generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    return out


@pytest.mark.parametrize("policy,budget", POLICIES)
def test_greedy_sequences_each_equal_the_single_sequence_output(policy, budget):
    expected = reference_greedy(MODEL, PROMPT, 12)
    engine = make_engine(policy, budget)
    out = generate(engine, SamplingParams(n=3, temperature=0, max_tokens=12, ignore_eos=True))
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert [c.token_ids for c in out.outputs] == [expected] * 3
    assert all(c.finish_reason == "length" for c in out.outputs)
    # Blocks conserved: every block is back (free or an evictable cached block).
    bm = engine.block_manager
    bm.check_invariants()
    assert bm.num_used_blocks == 0 and bm.num_requests == 0
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("policy,budget", POLICIES)
def test_seeded_sequences_are_reproducible_and_differ(policy, budget):
    params = SamplingParams(n=4, temperature=1.5, seed=7, max_tokens=10, ignore_eos=True)
    first = generate(make_engine(policy, budget), params)
    again = generate(make_engine(policy, budget), params)
    tokens = [c.token_ids for c in first.outputs]
    assert tokens == [c.token_ids for c in again.outputs]
    assert len({tuple(t) for t in tokens}) == 4
    # Sequence i samples with seed + i: sequence 0 is the n == 1 output with the same seed,
    # sequence 2 the one with seed + 2.
    single = SamplingParams(temperature=1.5, seed=7, max_tokens=10, ignore_eos=True)
    assert generate(make_engine(), single).outputs[0].token_ids == tokens[0]
    single.seed = 9
    assert generate(make_engine(), single).outputs[0].token_ids == tokens[2]


def test_best_of_returns_the_top_n_by_cumulative_logprob():
    params = SamplingParams(n=2, best_of=5, temperature=1.5, seed=3, max_tokens=8, ignore_eos=True)
    out = generate(make_engine(), params)
    everything = generate(make_engine(), SamplingParams(
        n=5, temperature=1.5, seed=3, max_tokens=8, ignore_eos=True, logprobs=0
    ))  # fmt: skip
    ranked = sorted(everything.outputs, key=lambda c: c.cumulative_logprob, reverse=True)
    assert [c.index for c in out.outputs] == [0, 1]
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in ranked[:2]]
    assert out.outputs[0].cumulative_logprob >= out.outputs[1].cumulative_logprob
    assert out.outputs[0].cumulative_logprob == pytest.approx(ranked[0].cumulative_logprob)
    assert all(c.logprobs is None for c in out.outputs)  # drawn for the ranking only


def test_prompt_blocks_shared_until_the_first_divergent_append_then_copied():
    engine = make_engine(caching=False)
    bm = engine.block_manager
    engine.add_request("r", PROMPT, SamplingParams(n=3, temperature=0, max_tokens=4))
    engine.step()  # the prefill: one request prefilled, two forked off it
    assert bm.num_requests == 3
    tables = [bm.block_table(s) for s in range(3)]
    assert all(np.array_equal(t, tables[0]) for t in tables)
    assert bm.num_used_blocks == 3  # ceil(21 / 8): the prompt's blocks, once
    assert [bm.refcounts()[b] for b in tables[0]] == [3, 3, 3]
    last = int(tables[0][-1])
    kv_before = engine.executor.worker.kv_pool[last].clone()

    out = engine.scheduler.schedule(0.0)  # the first decode appends into the shared block
    # Two of the three get a copy of the partly filled block; the last owner keeps it.
    assert out.block_copies.shape == (2, 2)
    assert set(out.block_copies[:, 0].tolist()) == {last}
    tables = [bm.block_table(s) for s in range(3)]
    assert [bm.refcounts()[b] for b in tables[0][:2]] == [3, 3]  # full blocks still shared
    assert len({int(t[-1]) for t in tables}) == 3
    assert bm.num_used_blocks == 5
    handle = engine.executor.execute_async(out, 0)
    engine.executor.wait(handle)
    pool = engine.executor.worker.kv_pool
    # Each copy holds the prompt's 5 tokens of the block; the token written at offset 5
    # went into each sequence's own block, so no sequence's KV overwrote another's.
    for dst in out.block_copies[:, 1].tolist():
        torch.testing.assert_close(pool[dst][..., :5, :], kv_before[..., :5, :])
    torch.testing.assert_close(pool[last][..., :5, :], kv_before[..., :5, :])


def test_without_the_copy_a_decode_would_corrupt_the_shared_block():
    """The copy is what keeps greedy copies right: a step that skipped it would write
    every sequence's new token into one block (tokens then depend on batch order)."""
    engine = make_engine(caching=False)
    out = generate(engine, SamplingParams(n=2, temperature=0, max_tokens=10, ignore_eos=True))
    assert out.outputs[0].token_ids == out.outputs[1].token_ids
    assert out.outputs[0].token_ids == reference_greedy(MODEL, PROMPT, 10)


def test_preempted_sequences_recompute_and_blocks_are_conserved():
    # 8 blocks: the prompt takes 3, each sequence grows into more: preemption must happen.
    engine = make_engine(num_blocks=8, seqs=4)
    scheduler = engine.scheduler
    schedule, preempted = scheduler.schedule, []

    def counting_schedule(now):
        out = schedule(now)
        preempted.extend(out.preempted)
        return out

    scheduler.schedule = counting_schedule
    params = SamplingParams(n=4, temperature=0, max_tokens=20, ignore_eos=True)
    out = generate(engine, params)
    assert preempted  # the rule under test ran: forked sequences recomputed on their own
    expected = reference_greedy(MODEL, PROMPT, 20)
    assert [c.token_ids for c in out.outputs] == [expected] * 4
    bm = engine.block_manager
    bm.check_invariants()
    assert bm.num_used_blocks == 0 and bm.num_requests == 0


def test_abort_finishes_every_sequence_of_the_group():
    engine = make_engine()
    engine.add_request("r", PROMPT, SamplingParams(n=3, max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.abort_request("r")
    outputs = engine.step()
    [out] = [o for o in outputs if o.finished]
    assert [c.finish_reason for c in out.outputs] == ["abort"] * 3
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished_requests()


def test_streaming_group_reports_every_sequence_by_index():
    engine = make_engine()
    params = SamplingParams(n=2, temperature=0, max_tokens=3, ignore_eos=True)
    engine.add_request("r", PROMPT, params, stream=True)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert all(o.request_id == "r" for o in outputs)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [1, 2, 3]
    assert all([c.index for c in o.outputs] == [0, 1] for o in outputs)
    assert outputs[-1].finished and not outputs[0].finished


def test_bad_n_and_best_of_are_refused_naming_the_argument():
    engine = make_engine(seqs=4)
    with pytest.raises(ValueError, match="best_of must be >= n"):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(ValueError, match="n=5; at most max_num_seqs=4"):
        engine.add_request("a", PROMPT, SamplingParams(n=5))
    engine.add_request("c#1", PROMPT, SamplingParams())
    with pytest.raises(ValueError, match="'c#1' \\(a sequence of 'c'\\) is in use"):
        engine.add_request("c", PROMPT, SamplingParams(n=2))


@pytest.mark.parametrize("after_sampling", [False, True])
def test_a_failing_group_fails_whole_and_alone(after_sampling):
    """Step isolation with forks: a request whose prompt step fails alone fails with every
    sequence forked off it (their KV was never written); a group batched beside it gets
    the tokens of a run without it."""
    params = SamplingParams(n=2, temperature=0.9, seed=5, max_tokens=6, ignore_eos=True)
    expected = generate(make_engine(), params)
    engine = make_engine()
    engine.executor = PoisonExecutor(engine.executor.worker, after_sampling)
    engine.add_request("ok", PROMPT, params)
    engine.add_request(POISON, [4, 6, 8, 10, 12], SamplingParams(n=3, max_tokens=6))
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o for o in engine.step() if o.finished})
    assert engine.executor.num_mixed_failures >= 1
    assert [c.finish_reason for c in outputs[POISON].outputs] == ["error"] * 3
    assert [c.token_ids for c in outputs["ok"].outputs] == [c.token_ids for c in expected.outputs]
    assert engine.block_manager.num_used_blocks == 0
    engine.block_manager.check_invariants()


def test_a_failed_step_re_runs_its_parts_with_the_block_copies():
    """A decode step with copy-on-write pairs fails (before anything ran) because of one
    request: the parts re-run without it must still copy the forked blocks first, or the
    forked sequence would attend over a block that was never copied."""
    copies = []

    class FailOnPoisonDecode(UniprocExecutor):
        def execute(self, scheduler_output):
            copies.extend(scheduler_output.block_copies.tolist())
            if any(r.request_id == "poison" for r in scheduler_output.decodes):
                raise RuntimeError("device fault")
            return super().execute(scheduler_output)

    params = SamplingParams(n=2, temperature=0, max_tokens=6, ignore_eos=True)
    engine = make_engine(caching=False)
    engine.executor = FailOnPoisonDecode(engine.executor.worker)
    engine.add_request("poison", [4, 6, 8, 10, 12], SamplingParams(max_tokens=6))
    engine.add_request("ok", PROMPT, params)
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o for o in engine.step() if o.finished})
    assert outputs["poison"].outputs[0].finish_reason == "error"
    expected = reference_greedy(MODEL, PROMPT, 6)
    assert [c.token_ids for c in outputs["ok"].outputs] == [expected, expected]
    assert engine.block_manager.num_used_blocks == 0
    # The copy holds the prompt's 5 tokens of the shared block (greedy tokens alone are
    # too robust to show a block of zeros).
    [(src, dst)] = {tuple(c) for c in copies}
    pool = engine.executor.worker.kv_pool
    torch.testing.assert_close(pool[dst][..., :5, :], pool[src][..., :5, :])


def test_data_parallel_replicas_serve_groups():
    config = engine_config(data_parallel_size=2)
    with DataParallelCore(config, DisaggConfig(launcher="thread")) as core:
        greedy = SamplingParams(n=3, temperature=0, max_tokens=5, ignore_eos=True)
        core.add_request("a", TINY[1], greedy)
        core.add_request("b", TINY[2], SamplingParams(n=2, best_of=3, seed=1, max_tokens=5))
        outputs = drain(core)
    assert [c.index for c in outputs["a"].outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in outputs["a"].outputs}) == 1
    assert [c.index for c in outputs["b"].outputs] == [0, 1]


def test_a_dead_executor_fails_every_sequence_of_a_group_in_its_step():
    """The step that forks a group fails engine-fatally: the forks fail with their request
    (none is left running on KV that was never written) and every block comes back."""
    from distserve_rt.distributed.launch import WorkerFailedError

    class Dead(UniprocExecutor):
        def execute(self, scheduler_output):
            raise WorkerFailedError("worker 0 died")

    engine = make_engine()
    engine.executor = Dead(engine.executor.worker)
    engine.add_request("r", PROMPT, SamplingParams(n=3, max_tokens=4))
    with pytest.raises(WorkerFailedError):
        engine.step()
    assert engine.scheduler.num_running == 0 and not engine.scheduler.has_unfinished_requests()
    assert engine.block_manager.num_used_blocks == 0
    engine.block_manager.check_invariants()


def test_tensor_parallel_workers_copy_the_forked_blocks_themselves():
    """TP = 2 worker processes get the copies in the pickled `StepBatch` and the repeated
    logits rows from its fork counts: seeded sequences equal the in-process engine's."""
    params = SamplingParams(n=3, temperature=0.8, seed=4, max_tokens=6, ignore_eos=True)
    tokens = []
    for tp in (1, 2):
        engine = LLMEngine(engine_config(tensor_parallel_size=tp))
        try:
            tokens.append([c.token_ids for c in generate(engine, params, TINY[2]).outputs])
        finally:
            engine.shutdown()
    assert tokens[0] == tokens[1] and len({tuple(t) for t in tokens[0]}) == 3
