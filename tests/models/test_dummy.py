"""dummy:<preset> models: every preset's shapes (on the meta device), the weight maps, and
tiny dummies that run, are deterministic and emit varied tokens."""

from __future__ import annotations

import pytest
import torch

from distserve_rt.distributed import ParallelContext
from distserve_rt.models import PRESETS, CausalLM, build_model, load_model
from distserve_rt.models.registry import model_class
from tests.models.paged_runner import PagedRunner, greedy_generate


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_on_meta_with_config_param_count(name):
    config = PRESETS[name]
    model = build_model(config, dtype=torch.bfloat16, device="meta")
    assert sum(p.numel() for p in model.parameters()) == config.num_params()
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_weight_map_covers_every_parameter(name):
    """Each (parameter, shard) is the target of exactly one checkpoint tensor."""
    config = PRESETS[name]
    model = build_model(config, device="meta")
    targets = [(t.param, t.shard_id) for t in model.stage_weight_map().values()]
    expected = [(n, s) for n, p in model.named_parameters() for s in p.shard_ids]
    assert sorted(targets, key=str) == sorted(expected, key=str)


@pytest.mark.parametrize("name", ["llama-2-70b", "opt-66b"])
def test_pipeline_stages_split_parameters(name):
    """PP=4 stages on meta hold exactly the whole model's parameters between them (plus a
    last-stage copy of the tied embedding)."""
    config = PRESETS[name]
    stages = [
        build_model(config, ParallelContext(pp_size=4, pp_rank=r), device="meta") for r in range(4)
    ]
    total = sum(p.numel() for s in stages for p in s.parameters())
    tied_copy = config.vocab_size * config.hidden_size if config.tie_word_embeddings else 0
    assert total == config.num_params() + tied_copy
    assert [(s.start_layer, s.end_layer) for s in stages][-1][1] == config.num_layers


@pytest.mark.parametrize(("tp", "what"), [(3, "num_heads"), (4, "num_kv_heads"), (8, "num_heads")])
def test_tp_that_does_not_divide_heads_is_rejected(tp, what):
    parallel = ParallelContext(tp_size=tp, tp_rank=0, tp_group=object())
    with pytest.raises(ValueError, match=rf"{what} \([\w/ ]+\) \(\d+\) must be divisible by"):
        build_model(PRESETS["llama-tiny"], parallel, device="meta")


@pytest.mark.parametrize("name", ["llama-tiny", "opt-tiny", "qwen3-tiny"])
def test_tiny_dummy_runs_deterministic_and_varied(name):
    model, config = load_model(f"dummy:{name}", seed=3)
    assert config is PRESETS[name]
    prompt = list(range(10, 30))
    tokens = greedy_generate(PagedRunner(model), prompt, 12)
    assert len(set(tokens)) >= 3, f"degenerate dummy output {tokens}"
    logits = PagedRunner(model).step(prefills=[(0, prompt)])
    assert torch.isfinite(logits).all() and logits.std() > 0.05
    again, _ = load_model(f"dummy:{name}", seed=3)
    torch.testing.assert_close(
        PagedRunner(again).step(prefills=[(0, prompt)]), logits, rtol=0, atol=0
    )
    other, _ = load_model(f"dummy:{name}", seed=4)
    assert not torch.equal(PagedRunner(other).step(prefills=[(0, prompt)]), logits)


@pytest.mark.parametrize("name", ["llama-tiny", "opt-tiny", "qwen3-tiny"])
def test_pipeline_stages_chained_equal_whole_model(name):
    whole, config = load_model(f"dummy:{name}")
    stages = [
        load_model(f"dummy:{name}", parallel=ParallelContext(pp_size=2, pp_rank=r))[0]
        for r in range(2)
    ]
    assert model_class(config) is type(stages[0])
    prompt = list(range(40, 61))
    ref_runner, pp_runner = PagedRunner(whole), PagedRunner(stages)
    torch.testing.assert_close(
        pp_runner.step(prefills=[(0, prompt)]), ref_runner.step(prefills=[(0, prompt)])
    )
    torch.testing.assert_close(pp_runner.step(decodes=[(0, 7)]), ref_runner.step(decodes=[(0, 7)]))
    with pytest.raises(ValueError, match="last pipeline stage"):
        stages[0].compute_logits(torch.zeros(1, config.hidden_size))


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset 'gpt-5'"):
        load_model("dummy:gpt-5")


def test_models_satisfy_the_causal_lm_protocol():
    model, _ = load_model("dummy:opt-tiny")
    assert isinstance(model, CausalLM)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["llama-tiny", "opt-tiny", "qwen3-tiny"])
def test_cuda_matches_cpu(name):
    """The same dummy model on the GPU kernels and on the CPU ones (fp32)."""
    prompt = list(range(50, 75))
    results = {}
    for device in ("cpu", "cuda"):
        model, _ = load_model(f"dummy:{name}", dtype="float32", device=device)
        runner = PagedRunner(model)
        prefill = runner.step(prefills=[(0, prompt)]).cpu()
        decode = runner.step(decodes=[(0, 9)]).cpu()
        results[device] = (prefill, decode, greedy_generate(PagedRunner(model), prompt, 8))
    cpu, cuda = results["cpu"], results["cuda"]
    torch.testing.assert_close(cuda[0], cpu[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(cuda[1], cpu[1], rtol=1e-3, atol=1e-3)
    assert cuda[2] == cpu[2]
