"""The disaggregated runtime on GPU (``cuda`` marker): spawned instance processes sharing one
GPU (``share_gpus``: the H200 sessions have one), KV pulled through ``cuda_ipc``.

Greedy outputs equal the colocated GPU engine's in float32 (in fp16/bf16 a different batch
mix may flip a near-tie, on any two engines); in bf16 every migration must arrive (the
`cuda_ipc` copies themselves are checked bit-exact, bf16 included, in
tests/transfer/test_cuda_ipc.py: a `faults.FaultPlan` cannot reach spawned GPU instances).
A killed decode process fails its requests only.
"""

from __future__ import annotations

import gc
import os
import signal

import pytest
import torch

from distserve_rt import LLM, SamplingParams
from distserve_rt.config import DisaggConfig, PhaseConfig, Placement
from distserve_rt.engine.controller import Controller
from distserve_rt.engine.disagg.tracking import Phase
from distserve_rt.engine.llm_engine import LLMEngine
from tests.engine.disagg_helpers import (
    PROMPTS,
    drain,
    engine_config,
    greedy,
    run,
    settle,
    token_ids,
)

pytestmark = pytest.mark.cuda

MAX_TOKENS = 40
# Each instance's share of the GPU (three instances and the colocated reference fit); the
# pools are capped far below it anyway (max_num_seqs x max_model_len).
UTILIZATION = 0.2


def _config(dtype: str = "float32"):
    return engine_config(
        device="cuda", dtype=dtype, gpu_memory_utilization=UTILIZATION, max_num_seqs=16
    )


@pytest.fixture(scope="module")
def reference():
    """Colocated greedy tokens of PROMPTS on the GPU (float32)."""
    engine = LLMEngine(_config())
    outputs = {}
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, greedy(MAX_TOKENS))
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o for o in engine.step() if o.finished})
    engine.shutdown()
    del engine
    gc.collect()
    torch.cuda.empty_cache()  # the instance processes size their pools without it
    return token_ids(outputs)


def _controller(num_decode: int = 1, dtype: str = "float32", **disagg) -> Controller:
    placement = Placement.disaggregated(PhaseConfig(), PhaseConfig(num_instances=num_decode))
    return Controller(_config(dtype), placement, DisaggConfig(share_gpus=True, **disagg))


def test_1p1d_sharing_one_gpu_equals_colocated_gpu(reference):
    with _controller() as c:
        assert [h.spec.engine_config.device for h in c.instances] == ["cuda:0", "cuda:0"]
        assert all(h.spec.shares_gpu for h in c.instances)
        outputs = run(c, max_tokens=MAX_TOKENS, timeout_s=120)
        assert token_ids(outputs) == reference
        settle(c, lambda: c.stats().transfers.num_transfers == len(PROMPTS), 30)
        stats = c.stats()
        assert stats.transfers.transport == "cuda_ipc"
        assert stats.transfers.num_transfers == len(PROMPTS) and stats.transfers.bytes > 0
        assert stats.transfers.num_failures == 0


def test_bf16_kv_arrives_through_the_llm_api():
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    dc = DisaggConfig(share_gpus=True)
    kwargs = dict(
        device="cuda", dtype="bfloat16", gpu_memory_utilization=UTILIZATION, max_model_len=256,
        max_num_seqs=16, log_stats_interval_s=0,
    )  # fmt: skip
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    with LLM("dummy:llama-tiny", placement="disaggregated", disagg_config=dc, **kwargs) as llm:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        controller = llm.llm_engine
        settle(controller, lambda: controller.stats().transfers.num_transfers == len(PROMPTS), 30)
        assert controller.stats().transfers.num_failures == 0
    assert [len(o.outputs[0].token_ids) for o in outputs] == [16] * len(PROMPTS)
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)


def test_killed_decode_process_fails_its_requests_only(reference):
    with _controller(num_decode=2) as c:
        for i, p in enumerate(PROMPTS):
            c.add_request(str(i), p, greedy(MAX_TOKENS))
        on = lambda d: [r for r in c.requests.values() if r.decode_index == d]  # noqa: E731
        settle(c, lambda: any(r.phase is Phase.DECODING for r in on(0)) and on(1), 60)
        victims = {r.request_id for r in on(0) if r.phase is Phase.DECODING}
        maybe = {r.request_id for r in on(0)} - victims  # pulling: fails, or goes to decode-1
        os.kill(c.decode(0).pid, signal.SIGKILL)
        outputs = drain(c, timeout_s=120)
        for i in range(len(PROMPTS)):
            out = outputs[str(i)]
            if str(i) in victims or (str(i) in maybe and out.outputs[0].finish_reason == "error"):
                assert "decode-0 died" in out.error
            else:
                assert out.outputs[0].token_ids == reference[i], out.error
        assert [s.alive for s in c.stats().instances] == [True, False, True]
        c.add_request("after", PROMPTS[0], greedy(MAX_TOKENS))
        assert drain(c, timeout_s=60)["after"].outputs[0].token_ids == reference[0]


def test_tp2_decode_on_its_own_gpus_equals_colocated(reference):
    if torch.cuda.device_count() < 3:
        pytest.skip("1 prefill + a TP=2 decode instance on their own GPUs need 3 GPUs")
    placement = Placement.disaggregated(PhaseConfig(), PhaseConfig(tp=2))
    with Controller(_config(), placement, DisaggConfig()) as c:
        assert [h.spec.engine_config.device for h in c.instances] == ["cuda:0", "cuda:1"]
        assert token_ids(run(c, max_tokens=MAX_TOKENS, timeout_s=120)) == reference
