"""Data-parallel colocated replicas (`DataParallelCore`): requests spread over the replicas
with outputs equal to one engine's, aborts reach the right replica, a dead replica fails
only its own requests, and the sizes come from EngineConfig or a colocated placement."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time

import pytest
import yaml

from distserve_rt.config import DisaggConfig, PhaseConfig, Placement
from distserve_rt.engine import data_parallel as dp_module
from distserve_rt.engine.async_llm import AsyncLLM
from distserve_rt.engine.core import make_engine_core
from distserve_rt.engine.data_parallel import DataParallelCore
from distserve_rt.engine.data_parallel_replica import replica_specs
from distserve_rt.engine.llm import LLM
from distserve_rt.engine.llm_engine import LLMEngine
from distserve_rt.engine.protocol import EngineCore, EngineDeadError
from distserve_rt.engine.stats import StatsLogger
from distserve_rt.sampling_params import SamplingParams
from tests.engine.disagg_helpers import PROMPTS, engine_config, greedy
from tests.engine.test_stats_log import DrivenClock

THREADS = DisaggConfig(launcher="thread")


def _drain(core, timeout_s: float = 60.0) -> dict:
    outputs, deadline = {}, time.monotonic() + timeout_s
    while core.has_unfinished_requests():
        assert time.monotonic() < deadline, "requests did not finish"
        for output in core.step(0.05):
            if output.finished:
                outputs[output.request_id] = output
    return outputs


def _single_engine_tokens(max_tokens: int) -> list[list[int]]:
    engine = LLMEngine(engine_config())
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, greedy(max_tokens))
    outputs = _drain(engine)
    engine.shutdown()
    return [outputs[str(i)].outputs[0].token_ids for i in range(len(PROMPTS))]


def test_two_replicas_share_the_requests_and_match_one_engine():
    with DataParallelCore(engine_config(data_parallel_size=2), THREADS) as core:
        assert isinstance(core, EngineCore)
        for i, p in enumerate(PROMPTS):
            core.add_request(str(i), p, greedy(8))
        # Least loaded: 5 requests alternate between two idle replicas (3 and 2).
        assert [len(h.requests) for h in core.replicas] == [3, 2]
        outputs = _drain(core)
        stats = core.stats()
        core.check_health()
    tokens = [outputs[str(i)].outputs[0].token_ids for i in range(len(PROMPTS))]
    assert tokens == _single_engine_tokens(8)
    assert [s.name for s in stats.instances] == ["colocated-0", "colocated-1"]
    assert all(s.role == "colocated" and s.alive for s in stats.instances)
    assert not any(h.requests or h.num_queued_tokens for h in core.replicas)


def test_the_fewest_unfinished_requests_win_then_the_fewest_queued_tokens():
    with DataParallelCore(engine_config(data_parallel_size=2), THREADS) as core:
        core.add_request("long", [5] * 40, greedy(200))
        core.add_request("short", [5] * 4, greedy(200))  # replica 1: fewer requests
        core.add_request("third", [5] * 4, greedy(200))  # 1 each: fewer tokens, replica 1
        assert [sorted(h.requests) for h in core.replicas] == [["long"], ["short", "third"]]
        deadline = time.monotonic() + 10.0  # the replicas report their load while busy
        while [s.num_running + s.num_waiting for s in core.stats().instances] != [1, 2]:
            assert time.monotonic() < deadline, core.stats()
            core.step(0.05)
        for request_id in ("long", "short", "third"):
            assert core.abort_request(request_id)
        _drain(core)


def test_abort_reaches_the_replica_holding_the_request():
    with DataParallelCore(engine_config(data_parallel_size=2), THREADS) as core:
        core.add_request("a", PROMPTS[0], greedy(20))
        core.add_request("b", PROMPTS[1], greedy(200))
        assert core.replicas[1].requests.keys() == {"b"}
        assert core.abort_request("b") and not core.abort_request("unknown")
        outputs = _drain(core)
        assert outputs["b"].outputs[0].finish_reason == "abort"
        assert outputs["a"].outputs[0].finish_reason == "length"
        assert not core.abort_request("b")  # finished


def test_bad_input_is_refused_by_the_core_and_ids_are_unique():
    with DataParallelCore(engine_config(data_parallel_size=2), THREADS) as core:
        with pytest.raises(ValueError, match="token"):
            core.add_request("bad", [10**9], greedy(4))
        with pytest.raises(ValueError, match="stop="):
            core.add_request("stop", [3, 4], SamplingParams(stop=["x"]))
        core.add_request("a", PROMPTS[0], greedy(2))
        with pytest.raises(ValueError, match="already in use"):
            core.add_request("a", PROMPTS[0], greedy(2))
        _drain(core)


def test_sizes_come_from_a_colocated_placement_or_are_refused():
    config = engine_config()
    planned = Placement.colocated(PhaseConfig(tp=2, pp=1, num_instances=3))
    applied = planned.apply_to(config)
    assert (applied.tensor_parallel_size, applied.data_parallel_size) == (2, 3)
    assert planned.apply_to(config.replace(tensor_parallel_size=2)) == applied
    with pytest.raises(ValueError, match="tensor_parallel_size=4 but the placement runs 3 x"):
        planned.apply_to(config.replace(tensor_parallel_size=4))
    with pytest.raises(ValueError, match="data_parallel_size=2 replicates colocated"):
        Placement.disaggregated().apply_to(config.replace(data_parallel_size=2))
    with pytest.raises(ValueError, match="LLMEngine is one replica"):
        LLMEngine(config.replace(data_parallel_size=2))


def test_cpu_replicas_get_disjoint_cores_or_a_clear_refusal():
    config = engine_config(data_parallel_size=2)
    specs = replica_specs(config, pin=True)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        with pytest.raises(ValueError, match="data_parallel_size=2 pins each replica"):
            replica_specs(config, pin=True)
        return
    assert [s.name for s in specs] == ["colocated-0", "colocated-1"]
    assert not set(specs[0].cpu_cores) & set(specs[1].cpu_cores)
    assert all(s.engine_config.data_parallel_size == 1 for s in specs)
    with pytest.raises(ValueError, match=r"data_parallel_size=\d+ pins each replica"):
        replica_specs(config.replace(data_parallel_size=len(cores) + 1), pin=True)


def test_sizes_that_do_not_fit_the_model_are_refused_before_any_replica_starts():
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide"):
        DataParallelCore(engine_config(data_parallel_size=2, tensor_parallel_size=3), THREADS)


def test_gpu_replicas_need_device_cuda():
    with pytest.raises(ValueError, match="device='cuda:1': data-parallel replicas"):
        replica_specs(engine_config(data_parallel_size=2, device="cuda:1"), pin=False)


@pytest.mark.slow
def test_replica_processes_a_killed_one_fails_only_its_requests():
    """Two spawned replicas (pinned to their own cores when there are two): killing one
    ends its requests with an error, the other's finish, new requests go to the live one,
    and check_health reports the loss."""
    placement = Placement.colocated(PhaseConfig(num_instances=2))
    dc = DisaggConfig(pin_cpus=len(os.sched_getaffinity(0)) >= 2)
    core = make_engine_core(engine_config(), placement, dc)
    try:
        assert isinstance(core, DataParallelCore)
        core.add_request("victim", PROMPTS[0], greedy(200))
        core.add_request("survivor", PROMPTS[1], greedy(6))
        victim = core.replicas[0]
        assert "victim" in victim.requests and victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        outputs = _drain(core)
        assert outputs["victim"].outputs[0].finish_reason == "error"
        assert "colocated-0 died" in outputs["victim"].error
        assert outputs["survivor"].outputs[0].finish_reason == "length"
        with pytest.raises(EngineDeadError, match=r"\['colocated-0'\] are dead; 1 of 2"):
            core.check_health()
        core.add_request("after", PROMPTS[2], greedy(3))
        assert "after" in core.replicas[1].requests
        assert len(_drain(core)["after"].outputs[0].token_ids) == 3
        assert [s.alive for s in core.stats().instances] == [False, True]
    finally:
        core.shutdown()


def test_async_llm_streams_first_token_first_from_the_replicas():
    async def main():
        async with AsyncLLM.from_config(engine_config(data_parallel_size=2), None, THREADS) as llm:

            async def collect(i: int):
                prompt = {"prompt_token_ids": PROMPTS[i]}
                return [o async for o in llm.generate(prompt, greedy(5), f"r{i}")]

            streams = await asyncio.gather(collect(0), collect(1))  # one per replica
            return streams, llm.stats()

    streams, stats = asyncio.run(asyncio.wait_for(main(), timeout=60))
    for outputs in streams:
        assert len(outputs[0].outputs[0].token_ids) == 1  # the first token, streamed at once
        assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 5
    assert [s.name for s in stats.instances] == ["colocated-0", "colocated-1"]


def test_llm_runs_a_colocated_placement_file_s_replicas_with_text(tmp_path):
    """LLM(placement=FILE) applies the file's replica count too (Python, not only serve),
    and the replicas detokenize as one engine does."""
    path = tmp_path / "colocated.yaml"
    raw = {"model": "llama-tiny", "placement": "colocated"}
    path.write_text(yaml.safe_dump({**raw, "prefill": {"tp": 1, "pp": 1, "num_instances": 2}}))
    kwargs = dict(block_size=8, max_model_len=256, kv_cache_memory_bytes=8 << 20)
    prompts = ["Hello there", "The capital of", "One two three"]
    with LLM("dummy:llama-tiny", **kwargs) as single:
        expected = single.generate(prompts, greedy(6), use_tqdm=False)
    with LLM("dummy:llama-tiny", placement=str(path), disagg_config=THREADS, **kwargs) as llm:
        assert isinstance(llm.llm_engine, DataParallelCore)
        assert len(llm.llm_engine.replicas) == 2
        outputs = llm.generate(prompts, greedy(6), use_tqdm=False)
    got = [(o.outputs[0].token_ids, o.outputs[0].text) for o in outputs]
    assert got == [(o.outputs[0].token_ids, o.outputs[0].text) for o in expected]
    assert all(text for _, text in got)


def _stats_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "tok/s" in r.getMessage()]


def test_the_core_logs_one_stats_line_for_all_replicas(monkeypatch, caplog):
    """The replicas' own lines are off (N unnamed lines); the core counts the tokens of the
    outputs it receives, on a driven clock."""
    clock = DrivenClock()
    monkeypatch.setattr(dp_module, "StatsLogger", functools.partial(StatsLogger, clock=clock))
    prompts = PROMPTS[:2]
    config = engine_config(data_parallel_size=2, log_stats_interval_s=10)
    with caplog.at_level("INFO", logger="distserve_rt"), DataParallelCore(config, THREADS) as core:
        for i, prompt in enumerate(prompts):
            core.add_request(str(i), prompt, greedy(4), stream=i == 0)  # busy from t=0
        clock.t = 2.0
        _drain(core)  # every step sees t=2: two busy seconds, then idle
        assert not _stats_lines(caplog)
        clock.t = 50.0
        core.step(0.0)
    (line,) = _stats_lines(caplog)
    num_prompt_tokens = sum(len(p) for p in prompts)
    expected = f"prefill {num_prompt_tokens / 2:.1f} tok/s, decode 3.0 tok/s "
    assert line.startswith(expected + "(busy 2.0 s of 50.0 s)")
    assert "| running 0, waiting 0 | KV usage colocated-0 0.0%, colocated-1 0.0% |" in line
    assert line.endswith("| preemptions 0")


@pytest.mark.parametrize("caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_a_follow_up_turn_goes_to_the_replica_holding_its_prefix(caching):
    """With the prefix cache on, a prompt that extends a live one goes where its blocks are,
    although the least-loaded rule (equal requests, fewer queued tokens) says the other
    replica; the multi-turn plans count on it. Off, the least loaded wins."""
    first = list(range(1, 33))  # four full blocks of 8
    config = engine_config(data_parallel_size=2, enable_prefix_caching=caching)
    with DataParallelCore(config, THREADS) as core:
        core.add_request("turn-1", first, greedy(200))
        core.add_request("other", [7] * 20, greedy(200))  # fewer requests: replica 1
        core.add_request("turn-2", [*first, 3, 4, 5], greedy(200))
        holder = 0 if caching else 1  # 1 request each; replica 1 has fewer tokens queued
        assert "turn-2" in core.replicas[holder].requests
        for request_id in ("turn-1", "other", "turn-2"):
            assert core.abort_request(request_id)
        _drain(core)
