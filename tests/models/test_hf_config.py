"""``config.json`` -> `ModelConfig` for the Qwen families: which projections have biases,
Qwen3's head_dim and q/k norms, parameter counts equal to transformers', and the sliding
window fields that Qwen configs carry switched off."""

from __future__ import annotations

import json

import pytest
import torch

from distserve_rt.models import ModelConfig, build_model
from tests.models.hf_fixtures import qwen_hf_config


def _hf_dict(version: int, **overrides) -> dict:
    """The config.json transformers writes for `qwen_hf_config`."""
    hf = json.loads(qwen_hf_config(version, **overrides).to_json_string())
    hf["architectures"] = [f"Qwen{version}ForCausalLM"]
    return hf


def test_qwen2_has_qkv_biases_and_no_o_proj_bias():
    config = ModelConfig.from_hf_config(_hf_dict(2))
    assert (config.architecture, config.qkv_bias, config.attention_bias) == ("qwen2", True, False)
    assert not config.qk_norm
    # A stray attention_bias key must not give Qwen2's o_proj a bias it does not have.
    stray = ModelConfig.from_hf_config({**_hf_dict(2), "attention_bias": True})
    assert (stray.qkv_bias, stray.attention_bias) == (True, False)


def test_qwen3_head_dim_and_qk_norm():
    config = ModelConfig.from_hf_config(_hf_dict(3))
    assert (config.architecture, config.head_dim, config.q_size) == ("qwen3", 32, 128)
    assert config.qk_norm and not config.qkv_bias
    # Qwen3Config's default head_dim is 128, not hidden_size / num_heads.
    no_head_dim = {k: v for k, v in _hf_dict(3).items() if k != "head_dim"}
    assert ModelConfig.from_hf_config(no_head_dim).head_dim == 128
    assert ModelConfig.from_hf_config({**_hf_dict(3), "attention_bias": True}).qkv_bias


@pytest.mark.parametrize(
    ("version", "overrides"),
    [(2, {}), (2, {"tie_word_embeddings": True}), (3, {}), (3, {"attention_bias": True})],
)
def test_num_params_equals_transformers(version, overrides):
    """The planner's count and our module's count both equal the HF model's."""
    from transformers import Qwen2ForCausalLM, Qwen3ForCausalLM

    hf_cls = {2: Qwen2ForCausalLM, 3: Qwen3ForCausalLM}[version]
    with torch.device("meta"):
        hf_model = hf_cls(qwen_hf_config(version, **overrides))
    expected = sum(p.numel() for p in hf_model.parameters())  # tied weights counted once
    config = ModelConfig.from_hf_config(_hf_dict(version, **overrides))
    ours = build_model(config, device="meta")
    assert config.num_params() == expected
    assert sum(p.numel() for p in ours.parameters()) == expected


@pytest.mark.parametrize("version", [2, 3])
def test_sliding_window_fields_switched_off_are_accepted(version):
    """Qwen2.5/Qwen3 config.json carry sliding_window with use_sliding_window false (every
    layer attends fully in transformers too), or on only from a layer that does not exist."""
    off = {**_hf_dict(version), "use_sliding_window": False, "sliding_window": 16}
    assert ModelConfig.from_hf_config(off).num_layers == 2
    no_sliding_layer = {**off, "use_sliding_window": True, "max_window_layers": 2}
    no_sliding_layer.pop("layer_types", None)  # older files: max_window_layers decides
    assert ModelConfig.from_hf_config(no_sliding_layer).num_layers == 2
    full_types = {**off, "use_sliding_window": True, "layer_types": ["full_attention"] * 2}
    assert ModelConfig.from_hf_config(full_types).num_layers == 2


@pytest.mark.parametrize("version", [2, 3])
def test_sliding_window_in_use_is_refused(version):
    on = {**_hf_dict(version), "use_sliding_window": True, "sliding_window": 16}
    on["layer_types"] = ["full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="sliding_window=16 .*not supported"):
        ModelConfig.from_hf_config(on)
    older = {k: v for k, v in on.items() if k != "layer_types"} | {"max_window_layers": 1}
    with pytest.raises(ValueError, match="sliding_window=16"):
        ModelConfig.from_hf_config(older)


def test_unsupported_architecture_lists_the_supported_ones():
    hf = {**_hf_dict(2), "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2"}
    with pytest.raises(ValueError, match="unsupported architecture") as info:
        ModelConfig.from_hf_config(hf)
    message = str(info.value)
    assert "\n" not in message
    supported = ("Llama", "Mistral", "Qwen2", "Qwen3", "Phi3", "Gemma", "OPT")
    for name in (f"{family}ForCausalLM" for family in supported):
        assert name in message


def _phi3_dict(**overrides) -> dict:
    from tests.models.hf_fixtures import phi3_hf_config

    hf = json.loads(phi3_hf_config(**overrides).to_json_string())
    hf["architectures"] = ["Phi3ForCausalLM"]
    return hf


def test_phi3_num_params_equals_transformers():
    from transformers import Phi3ForCausalLM

    from tests.models.hf_fixtures import phi3_hf_config

    with torch.device("meta"):
        expected = sum(p.numel() for p in Phi3ForCausalLM(phi3_hf_config()).parameters())
    config = ModelConfig.from_hf_config(_phi3_dict())
    assert (config.architecture, config.qkv_bias, config.attention_bias) == ("phi3", False, False)
    assert config.num_params() == expected
    assert sum(p.numel() for p in build_model(config, device="meta").parameters()) == expected


def test_phi3_variants_we_would_compute_wrongly_are_refused():
    # Phi-4-mini: RoPE on 3/4 of each head (transformers 5 keeps it in rope_parameters).
    partial = _phi3_dict()
    partial["rope_parameters"] = {**partial["rope_parameters"], "partial_rotary_factor": 0.75}
    with pytest.raises(ValueError, match="partial_rotary_factor=0.75; only 1.0"):
        ModelConfig.from_hf_config(partial)
    older = {k: v for k, v in _phi3_dict().items() if k != "rope_parameters"}  # top level
    with pytest.raises(ValueError, match="partial_rotary_factor=0.5"):
        ModelConfig.from_hf_config({**older, "rope_theta": 1e4, "partial_rotary_factor": 0.5})
    # Phi-3-mini-4k: a 2047-token window in a 4096-token context.
    windowed = {**_phi3_dict(), "sliding_window": 2047, "max_position_embeddings": 4096}
    with pytest.raises(ValueError, match="sliding_window=2047"):
        ModelConfig.from_hf_config(windowed)
    # Phi-3-*-128k and Phi-3.5: LongRoPE.
    longrope = _phi3_dict()
    longrope["rope_parameters"] = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0] * 8,
        "long_factor": [2.0] * 8,
    }
    with pytest.raises(ValueError, match="rope_scaling type 'longrope' is not supported"):
        build_model(ModelConfig.from_hf_config(longrope), device="meta")


def _gemma_dict(**overrides) -> dict:
    from tests.models.hf_fixtures import gemma_hf_config

    hf = json.loads(gemma_hf_config(**overrides).to_json_string())
    hf["architectures"] = ["GemmaForCausalLM"]
    return hf


def test_gemma_config_and_num_params():
    from transformers import GemmaForCausalLM

    from tests.models.hf_fixtures import gemma_hf_config

    with torch.device("meta"):
        expected = sum(p.numel() for p in GemmaForCausalLM(gemma_hf_config()).parameters())
    config = ModelConfig.from_hf_config(_gemma_dict())
    assert (config.architecture, config.head_dim, config.tie_word_embeddings) == ("gemma", 32, True)
    assert config.num_params() == expected
    assert sum(p.numel() for p in build_model(config, device="meta").parameters()) == expected
    # Gemma 1.0's config.json says "gelu" and means the tanh approximation, as in transformers.
    assert ModelConfig.from_hf_config({**_gemma_dict(), "hidden_act": "gelu"}).architecture
    without = {
        k: v for k, v in _gemma_dict().items() if k not in ("head_dim", "tie_word_embeddings")
    }
    assert (ModelConfig.from_hf_config(without).head_dim, config.tie_word_embeddings) == (256, True)


def test_gemma_variants_we_would_compute_wrongly_are_refused():
    with pytest.raises(ValueError, match="hidden_act='relu'; only 'gelu_pytorch_tanh' or 'gelu'"):
        ModelConfig.from_hf_config({**_gemma_dict(), "hidden_act": "relu"})
    with pytest.raises(ValueError, match="use_bidirectional_attention=True"):
        ModelConfig.from_hf_config({**_gemma_dict(), "use_bidirectional_attention": True})
    for arch, model_type in (("Gemma2ForCausalLM", "gemma2"), ("Gemma3ForCausalLM", "gemma3")):
        gemma_n = {**_gemma_dict(), "architectures": [arch], "model_type": model_type}
        with pytest.raises(ValueError, match=f"unsupported architecture.*{arch}.*GemmaForCausalLM"):
            ModelConfig.from_hf_config(gemma_n)
