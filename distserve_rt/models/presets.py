"""Named architecture shapes: ``dummy:<preset>`` models (random weights) and planner inputs.

Shapes are copied from the models' published Hugging Face ``config.json`` files. The
``*-tiny`` presets are ours: small enough that a 2-core CPU runs them at interactive speed,
with the same structure as the real families (GQA for Llama, OPT's learned positions,
Qwen3's q/k norms and head_dim wider than hidden / heads).
Their vocabulary (512) fits the built-in byte tokenizer that dummy models use.
"""

from __future__ import annotations

from distserve_rt.models.config import ModelConfig


def _opt(name: str, hidden: int, layers: int, heads: int, ffn: int) -> ModelConfig:
    return ModelConfig(
        architecture="opt",
        vocab_size=50272,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
        name=name,
    )


def _llama(
    name: str,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    ffn: int,
    *,
    vocab: int = 32000,
    max_pos: int = 4096,
    rope_theta: float = 10000.0,
    rope_scaling: dict | None = None,
    bos: int = 1,
    eos: int = 2,
    architecture: str = "llama",
    head_dim: int | None = None,
    norm_eps: float = 1e-5,
) -> ModelConfig:
    return ModelConfig(
        architecture=architecture,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim or hidden // heads,
        max_position_embeddings=max_pos,
        norm_eps=norm_eps,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        bos_token_id=bos,
        eos_token_id=eos,
        name=name,
    )


_LLAMA3 = dict(vocab=128256, max_pos=8192, rope_theta=500000.0, bos=128000, eos=128001)
_LLAMA31_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

_QWEN = dict(vocab=151936, max_pos=32768, rope_theta=1e6, bos=151643, eos=151645, norm_eps=1e-6)

PRESETS: dict[str, ModelConfig] = {
    # OPT (the paper's models): facebook/opt-* config.json.
    "opt-125m": _opt("opt-125m", 768, 12, 12, 3072),
    "opt-1.3b": _opt("opt-1.3b", 2048, 24, 32, 8192),
    "opt-6.7b": _opt("opt-6.7b", 4096, 32, 32, 16384),
    "opt-13b": _opt("opt-13b", 5120, 40, 40, 20480),
    "opt-30b": _opt("opt-30b", 7168, 48, 56, 28672),
    "opt-66b": _opt("opt-66b", 9216, 64, 72, 36864),
    "opt-175b": _opt("opt-175b", 12288, 96, 96, 49152),
    # Llama: meta-llama/* config.json.
    "llama-2-7b": _llama("llama-2-7b", 4096, 32, 32, 32, 11008),
    "llama-2-13b": _llama("llama-2-13b", 5120, 40, 40, 40, 13824),
    "llama-2-70b": _llama("llama-2-70b", 8192, 80, 64, 8, 28672),
    "llama-3-8b": _llama("llama-3-8b", 4096, 32, 32, 8, 14336, **_LLAMA3),
    "llama-3-70b": _llama("llama-3-70b", 8192, 80, 64, 8, 28672, **_LLAMA3),
    "llama-3.1-8b": _llama(
        "llama-3.1-8b",
        4096,
        32,
        32,
        8,
        14336,
        **{**_LLAMA3, "max_pos": 131072},
        rope_scaling=_LLAMA31_SCALING,
    ),
    # Qwen: Qwen/* config.json (the Instruct models' eos).
    "qwen2.5-7b": _llama(
        "qwen2.5-7b", 3584, 28, 28, 4, 18944, **{**_QWEN, "vocab": 152064}, architecture="qwen2"
    ),
    "qwen3-8b": _llama(
        "qwen3-8b", 4096, 36, 32, 8, 12288, **{**_QWEN, "max_pos": 40960}, architecture="qwen3"
    ),
    # Tiny, ours: fast on 2 CPU cores; GQA 2:1 and head_dim 64 like the real families.
    "llama-tiny": _llama("llama-tiny", 256, 4, 4, 2, 768, vocab=512, max_pos=4096),
    "qwen3-tiny": _llama(
        "qwen3-tiny", 256, 4, 4, 2, 768, vocab=512, architecture="qwen3", head_dim=128
    ),
    "opt-tiny": ModelConfig(
        architecture="opt",
        vocab_size=512,
        hidden_size=256,
        intermediate_size=1024,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
        name="opt-tiny",
    ),
}


def get_preset(name: str) -> ModelConfig:
    """The preset ``name`` (case-insensitive); ValueError listing the choices otherwise."""
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[key]
