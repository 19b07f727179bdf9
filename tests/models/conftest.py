"""Saved tiny HF checkpoints shared by the model tests (written once per session)."""

from __future__ import annotations

import pytest

from tests.models.hf_fixtures import save_gemma, save_llama, save_opt, save_phi3, save_qwen

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so the tests' positions span the scaled, smoothed and unscaled frequencies.
    "original_max_position_embeddings": 32,
}

# name -> (saver, config overrides)
CHECKPOINTS = {
    "llama-gqa": (save_llama, {}),
    "llama-tied-bias": (
        save_llama,
        dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True, num_key_value_heads=4),
    ),
    "llama3-rope": (save_llama, dict(rope_parameters=LLAMA3_ROPE, num_key_value_heads=1)),
    "opt": (save_opt, {}),
    "qwen2": (save_qwen, dict(version=2)),
    # Qwen2.5-0.5B/1.5B/3B tie the LM head to the embedding.
    "qwen2-tied": (save_qwen, dict(version=2, tie_word_embeddings=True)),
    "qwen3": (save_qwen, dict(version=3)),
    "phi3": (save_phi3, {}),
    "gemma": (save_gemma, {}),
}


@pytest.fixture(scope="session")
def checkpoint_dirs(tmp_path_factory):
    """name -> directory of each CHECKPOINTS entry, saved on first use."""
    root = tmp_path_factory.mktemp("hf_checkpoints")
    saved = {}

    def get(name: str):
        if name not in saved:
            saver, overrides = CHECKPOINTS[name]
            saved[name] = saver(root / name, **overrides)
        return saved[name]

    return get


@pytest.fixture(params=sorted(CHECKPOINTS))
def checkpoint(request, checkpoint_dirs):
    """(name, directory) for every checkpoint kind."""
    return request.param, checkpoint_dirs(request.param)
