"""The disaggregated runtime with spawned instance processes (pinned to cores when there are
enough): greedy outputs equal HF transformers and the colocated engine on a saved HF Llama;
a decode or prefill process killed with SIGKILL mid-run; no /dev/shm left behind. (KV
bit-exactness is checked with instances on threads: `FaultPlan(verify_kv=True)` in
tests/engine/test_disagg_controller.py.)"""

from __future__ import annotations

import glob
import os
import signal

import pytest
import torch

from distserve_rt import LLM, SamplingParams
from distserve_rt.config import DisaggConfig, PhaseConfig, Placement
from distserve_rt.engine.controller import Controller
from distserve_rt.engine.disagg.tracking import Phase
from distserve_rt.engine.llm_engine import LLMEngine
from distserve_rt.transfer.shm_region import SHM_DIR, region_glob
from tests.engine.disagg_helpers import PROMPTS, drain, engine_config, greedy, settle, token_ids
from tests.models.hf_fixtures import load_hf, save_llama, save_tokenizer

TEXTS = ["the quick brown fox", "prefill and decode run on", "hello world, hello"]


def _shm_files(pids) -> list[str]:
    return [f for pid in pids for f in glob.glob(f"{SHM_DIR}/{region_glob(pid)}")]


def test_greedy_equals_hf_and_colocated_across_processes(tmp_path):
    path = save_tokenizer(save_llama(tmp_path / "llama"))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    kwargs = dict(kv_cache_memory_bytes=4 << 20, log_stats_interval_s=0, max_model_len=128)
    colocated = LLM(str(path), **kwargs).generate(TEXTS, params, use_tqdm=False)
    config = DisaggConfig(pin_cpus=len(os.sched_getaffinity(0)) >= 2)
    with LLM(str(path), placement="disaggregated", disagg_config=config, **kwargs) as llm:
        pids = [h.pid for h in llm.llm_engine.instances]
        disagg = llm.generate(TEXTS, params, use_tqdm=False)
        engine = llm.llm_engine
        settle(engine, lambda: engine.stats().transfers.num_transfers == len(TEXTS))
        assert _shm_files(pids[:1])  # the prefill pool lives in /dev/shm while running
    assert not _shm_files(pids)
    hf = load_hf(path)
    for c, d in zip(colocated, disagg, strict=True):
        assert d.outputs[0].token_ids == c.outputs[0].token_ids
        assert d.outputs[0].text == c.outputs[0].text
        ids = torch.tensor([d.prompt_token_ids])
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        assert d.outputs[0].token_ids == ref[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def reference():
    """Colocated greedy tokens of PROMPTS, 40 tokens each."""
    engine = LLMEngine(engine_config())
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, greedy(40))
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o for o in engine.step() if o.finished})
    return token_ids(outputs)


def _processes(num_prefill: int, num_decode: int, **disagg) -> Controller:
    placement = Placement.disaggregated(
        PhaseConfig(num_instances=num_prefill), PhaseConfig(num_instances=num_decode)
    )
    return Controller(engine_config(), placement, DisaggConfig(pin_cpus=False, **disagg))


def test_killed_decode_fails_its_requests_clearly_and_others_complete(reference):
    with _processes(1, 2) as c:
        pids = [h.pid for h in c.instances]
        for i, p in enumerate(PROMPTS):
            c.add_request(str(i), p, greedy(40))
        on = lambda d: [r for r in c.requests.values() if r.decode_index == d]  # noqa: E731
        settle(c, lambda: any(r.phase is Phase.DECODING for r in on(0)) and on(1), 30)
        victims = {r.request_id for r in on(0) if r.phase is Phase.DECODING}
        # A pull decode-0 was doing may or may not have completed before the kill: its
        # request then fails, or its KV (still on the prefill instance) goes to decode-1.
        maybe = {r.request_id for r in on(0)} - victims
        os.kill(c.decode(0).pid, signal.SIGKILL)
        outputs = drain(c, timeout_s=60)
        for i in range(len(PROMPTS)):
            out = outputs[str(i)]
            if str(i) in victims or (str(i) in maybe and out.outputs[0].finish_reason == "error"):
                assert out.outputs[0].finish_reason == "error"
                assert "decode-0 died" in out.error
            else:
                assert out.outputs[0].token_ids == reference[i], out.error
        assert [s.alive for s in c.stats().instances] == [True, False, True]
        c.check_health()  # decode-1 still serves
        c.add_request("after", PROMPTS[0], greedy(40))
        assert drain(c)["after"].outputs[0].token_ids == reference[0]
    assert not _shm_files(pids)


def test_decode_death_before_its_pulls_hands_the_kv_to_another_decode(reference):
    # decode-0 is stopped (SIGSTOP) before any request: the requests forwarded to it stay
    # MIGRATING, their KV on the prefill instance, until it is killed; then decode-1 pulls
    # all of it. (No wall-clock window: a stopped process pulls nothing, however long.)
    with _processes(1, 2) as c:
        os.kill(c.decode(0).pid, signal.SIGSTOP)
        for i, p in enumerate(PROMPTS):
            c.add_request(str(i), p, greedy(40))
        on_0 = lambda: [r for r in c.requests.values() if r.decode_index == 0]  # noqa: E731
        settle(c, lambda: len(on_0()) >= 1, 30)
        assert all(r.phase is Phase.MIGRATING for r in on_0())
        os.kill(c.decode(0).pid, signal.SIGKILL)
        outputs = drain(c, timeout_s=60)
        assert token_ids(outputs) == reference
        assert [s.alive for s in c.stats().instances] == [True, False, True]


def test_killed_prefill_requests_are_retried_elsewhere(reference):
    with _processes(2, 1, retry_on_instance_failure=True) as c:
        pids = [h.pid for h in c.instances]
        for i, p in enumerate(PROMPTS * 2):
            c.add_request(str(i), p, greedy(40))
        assert any(r.prefill_index == 0 for r in c.requests.values())
        os.kill(c.prefill(0).pid, signal.SIGKILL)
        outputs = drain(c, timeout_s=60)
        for i in range(2 * len(PROMPTS)):
            assert outputs[str(i)].outputs[0].token_ids == reference[i % len(PROMPTS)]
        assert [s.alive for s in c.stats().instances] == [False, True, True]
    assert not _shm_files(pids)
