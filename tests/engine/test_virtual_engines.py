"""Virtual engines without processes: a deferred in-process executor (steps run at `wait`,
with the virtual engine's block offset) under pipeline_parallel_size=2 gives the tokens of
a cache-free loop, keeps two batches in flight, and drops the token of a request aborted
while its batch is in flight."""

from __future__ import annotations

import pytest

from distserve_rt import SamplingParams
from distserve_rt.core.scheduler import SchedulerConfig
from distserve_rt.engine import EngineConfig, LLMEngine
from distserve_rt.engine.protocol import EngineCore
from distserve_rt.engine.virtual_engine import make_virtual_engines
from distserve_rt.worker.executor import UniprocExecutor
from distserve_rt.worker.step_batch import StepBatch
from distserve_rt.worker.worker import Worker
from tests.engine.fakes import FAKE_CONFIG, FakeCausalLM

PROMPTS = [[3 + (5 * i + 3 * j) % 60 for j in range(3 + 4 * i)] for i in range(5)]


class DeferredExecutor(UniprocExecutor):
    """Runs a step only when it is waited for, in the shared pool at the step's offset."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(worker)
        self.pending: dict[int, tuple] = {}
        self.offsets: set[int] = set()
        self.max_num_in_flight = 0
        self._next = 0

    def execute_async(self, scheduler_output, block_offset: int = 0) -> int:
        self.pending[self._next] = (scheduler_output, block_offset)
        self.max_num_in_flight = max(self.max_num_in_flight, len(self.pending))
        self._next += 1
        return self._next - 1

    def wait(self, handle):
        out, offset = self.pending.pop(handle)
        self.offsets.add(offset)
        batch = StepBatch.from_scheduler_output(out)
        batch.shift_blocks(offset, self.worker.config.block_size)
        runner = self.worker.runner
        return runner.execute(runner.prepare_batch(batch, out.sampling_requests()))


def _engine(num_blocks: int) -> tuple[LLMEngine, DeferredExecutor]:
    c = FAKE_CONFIG
    block_bytes = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 8 * 4
    config = EngineConfig(
        model="fake",
        block_size=8,
        max_num_seqs=2,
        max_model_len=64,
        kv_cache_memory_bytes=num_blocks * block_bytes,
        pipeline_parallel_size=2,
        log_stats_interval_s=0,
    )
    model = FakeCausalLM()
    executor = DeferredExecutor(Worker(config, model=model))
    return LLMEngine(config, executor=executor), executor


def _run(engine: LLMEngine) -> dict[str, list[int]]:
    """Request id -> tokens; the preemption count is stored under "num_preemptions"."""
    tokens: dict = {"num_preemptions": 0}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
                tokens["num_preemptions"] += out.metrics.num_preemptions
    return tokens


@pytest.mark.parametrize("num_blocks", [64, 8])  # 8: 4 blocks per virtual engine, preempts
def test_two_virtual_engines_equal_cache_free_loop(num_blocks):
    engine, executor = _engine(num_blocks)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, params)
    assert {len(ve.scheduler.waiting) for ve in engine.virtual_engines} == {2, 3}
    tokens = _run(engine)
    assert (tokens.pop("num_preemptions") > 0) == (num_blocks == 8)
    model = executor.worker.model
    assert tokens == {str(i): model.reference_greedy(p, 6) for i, p in enumerate(PROMPTS)}
    assert executor.max_num_in_flight == 2
    assert executor.offsets == {0, executor.worker.num_kv_blocks // 2}


def test_abort_while_in_flight_drops_the_token():
    engine, executor = _engine(64)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("a", PROMPTS[0], params)
    engine.add_request("b", PROMPTS[1], params)
    engine.step()  # both batches submitted, "a"'s completed
    assert engine.abort_request("b")  # its batch is still in flight
    tokens = _run(engine)
    assert tokens["a"] == executor.worker.model.reference_greedy(PROMPTS[0], 4)
    assert tokens["b"] == []
    assert all(ve.block_manager.num_used_blocks == 0 for ve in engine.virtual_engines)


def test_a_share_without_blocks_is_rejected():
    with pytest.raises(ValueError, match="3 KV blocks cannot be shared by 4 virtual engines"):
        make_virtual_engines(4, 3, 8, 0.0, "continuous_batching", SchedulerConfig())


def test_colocated_stats_count_every_virtual_engine():
    engine, _ = _engine(num_blocks=64)
    for i, prompt in enumerate(PROMPTS[:4]):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=8))
    assert isinstance(engine, EngineCore)
    engine.step()
    (instance,) = engine.stats().instances
    schedulers = [ve.scheduler for ve in engine.virtual_engines]
    assert len(schedulers) == 2
    assert instance.num_running == sum(s.num_running for s in schedulers) == 4
    assert instance.num_waiting == sum(s.num_waiting for s in schedulers)
