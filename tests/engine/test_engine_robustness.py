"""Requests that must fail alone: model-dependent parameter checks at admission, a step
that raises, and the engine seed; plus positions of chunks past 64k tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distserve_rt import SamplingParams
from distserve_rt.core.scheduler import ScheduledPrefill, SchedulerOutput
from distserve_rt.engine import EngineConfig, LLMEngine
from distserve_rt.models.config import ModelConfig
from distserve_rt.worker.executor import UniprocExecutor
from tests.engine.fakes import FakeCausalLM
from tests.engine.test_engine_fake_model import MAX_TOKENS, PROMPTS, make_llm
from tests.worker.test_prepare_inputs import make_request, make_runner


def test_model_dependent_params_are_rejected_at_admission():
    engine = make_llm().llm_engine
    with pytest.raises(ValueError, match=r"stop_token_ids must be in \[0, 64\), got 64"):
        engine.add_request("a", [1, 2], SamplingParams(stop_token_ids=[64]))
    with pytest.raises(ValueError, match="logprobs must be <= 20, got 21"):
        engine.add_request("b", [1, 2], SamplingParams(logprobs=21))
    assert not engine.has_unfinished_requests()


class FailingOnceExecutor(UniprocExecutor):
    """Raises on the first step that contains `poison`, then works normally."""

    def __init__(self, worker, poison: str) -> None:
        super().__init__(worker)
        self.poison, self.failed = poison, False

    def execute(self, scheduler_output):
        ids = [r.request_id for r in scheduler_output.sampling_requests()]
        ids += [p.request.request_id for p in scheduler_output.prefills]
        if not self.failed and self.poison in ids:
            self.failed = True
            raise RuntimeError("device fault")
        return super().execute(scheduler_output)


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on():
    llm = make_llm(max_num_seqs=1)  # one request per step: the failure hits only "1"
    engine = llm.llm_engine
    engine.executor = FailingOnceExecutor(engine.executor.worker, poison="1")
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_request(str(i), prompt, params)
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o for o in engine.step() if o.finished})
    assert outputs["1"].outputs[0].finish_reason == "error"
    assert "device fault" in outputs["1"].error
    for rid in ("0", "2"):
        assert outputs[rid].outputs[0].finish_reason == "length"
        assert len(outputs[rid].outputs[0].token_ids) == MAX_TOKENS
    assert engine.block_manager.num_used_blocks == 0


def test_engine_seed_makes_unseeded_sampling_reproducible():
    def run(seed):
        config = EngineConfig(model="fake", block_size=8, kv_cache_memory_bytes=1 << 20, seed=seed)
        engine = LLMEngine(config.replace(log_stats_interval_s=0), model=FakeCausalLM())
        engine.add_request("r", [3, 4, 5], SamplingParams(temperature=1.0, max_tokens=24))
        while engine.has_unfinished_requests():
            (out,) = engine.step() or [None]
        return out.outputs[0].token_ids

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_prefill_chunk_positions_past_64k():
    runner = make_runner()
    request = make_request(0, 4)
    request.token_ids = list(range(8)) * 9000  # 72k tokens
    start = 70_000
    out = SchedulerOutput(
        prefills=[ScheduledPrefill(request, 5, start, False)], num_prefill_tokens=5
    )
    out.slot_mapping = np.full(5, -1, dtype=np.int64)  # padding: nothing written
    out.prefill_block_tables = np.zeros((1, 1), dtype=np.int32)
    mi = runner.prepare_inputs(out)
    assert mi.positions.tolist() == list(range(start, start + 5))


def test_extra_eos_ids_of_llama3_instruct_end_a_turn():
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "eos_token_id": [2, 9, 11],
    }
    config = ModelConfig.from_hf_config(hf)
    assert config.eos_token_id == 2 and config.extra_eos_token_ids == (9, 11)
    engine = make_llm().llm_engine
    engine.model_config = engine.model_config.replace(extra_eos_token_ids=(9, 11))
    request = engine.add_request("a", [1, 2], SamplingParams(stop_token_ids=[11]))
    assert request.sampling_params.stop_token_ids == [11, 9]
    ignoring = engine.add_request("b", [1, 2], SamplingParams(ignore_eos=True))
    assert ignoring.sampling_params.stop_token_ids == []


def test_sliding_window_models_are_refused():
    hf = {
        "architectures": ["MistralForCausalLM"],
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 32768,
        "sliding_window": 4096,
    }
    with pytest.raises(ValueError, match="sliding_window=4096"):
        ModelConfig.from_hf_config(hf)
    assert ModelConfig.from_hf_config({**hf, "sliding_window": None}).num_layers == 1


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("dtype", "bogus", "dtype must be one of"),
        ("dtype", torch.int8, "dtype must be one of"),
        ("device", "cuda:abc", "device must be"),
        ("log_stats_interval_s", float("nan"), "log_stats_interval_s"),
    ],
)
def test_engine_config_rejects(field, value, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**{field: value})
