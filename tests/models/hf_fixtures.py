"""Small random Hugging Face models and tokenizers saved as local directories, for parity
tests here and for engine/e2e tests that need a real checkpoint on disk (no downloads).

    from tests.models.hf_fixtures import save_gemma, save_llama, save_opt, save_phi3
    path = save_llama(tmp_path / "llama", num_kv_heads=2, tie_word_embeddings=False)

Weights are HF's random initialisation with a larger std (sharper logits, so greedy
decoding has no near-ties that rounding could flip) plus noise on every norm weight and
bias, so that a parameter loaded into the wrong place changes the logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

VOCAB_SIZE = 320
TOKENIZER_VOCAB_SIZE = 300
INIT_STD = 0.1
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "prefill and decode run on different instances",
    "the key value cache moves from prefill to decode",
    "hello world, hello tokens, hello paged attention",
    "goodput is the rate at which requests meet their slos",
] * 4


def _perturb(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:  # norms (1) and biases (0): make each one distinguishable
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)


def llama_hf_config(**overrides: Any):
    from transformers import LlamaConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        initializer_range=INIT_STD,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def qwen_hf_config(version: int, **overrides: Any):
    """A tiny ``Qwen2Config`` (version 2) or ``Qwen3Config`` (3); Qwen3's head_dim 32 makes
    q (4 heads x 32) wider than hidden (64), as in real Qwen3 checkpoints."""
    from transformers import Qwen2Config, Qwen3Config

    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        initializer_range=INIT_STD,
        tie_word_embeddings=False,
        use_sliding_window=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    if version == 3:
        kwargs["head_dim"] = 32
    kwargs.update(overrides)
    return {2: Qwen2Config, 3: Qwen3Config}[version](**kwargs)


def phi3_hf_config(**overrides: Any):
    from transformers import Phi3Config

    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        original_max_position_embeddings=256,
        rms_norm_eps=1e-5,
        initializer_range=INIT_STD,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return Phi3Config(**kwargs)


def gemma_hf_config(**overrides: Any):
    """A tiny ``GemmaConfig``: tied embeddings and head_dim 32 (q wider than hidden), as in
    Gemma-2B/7B."""
    from transformers import GemmaConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        initializer_range=INIT_STD,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return GemmaConfig(**kwargs)


def opt_hf_config(**overrides: Any):
    from transformers import OPTConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        init_std=INIT_STD,
        word_embed_proj_dim=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        dropout=0.0,
    )
    kwargs.update(overrides)
    return OPTConfig(**kwargs)


def _save(model, path: Path, seed: int, max_shard_size: str | None) -> Path:
    _perturb(model, seed)
    path.mkdir(parents=True, exist_ok=True)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


def save_llama(path: Path, *, seed: int = 0, max_shard_size: str | None = None, **config) -> Path:
    """Saves a random ``LlamaForCausalLM`` (GQA 4:2, 2 layers, hidden 64) to `path`;
    `config` overrides LlamaConfig fields (e.g. ``tie_word_embeddings=True``,
    ``rope_parameters={...}``, ``attention_bias=True``). Returns `path`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_hf_config(**config)).eval()
    return _save(model, path, seed, max_shard_size)


def save_qwen(
    path: Path, version: int, *, seed: int = 0, max_shard_size: str | None = None, **config
) -> Path:
    """Saves a random ``Qwen2ForCausalLM`` (`version` 2: q/k/v biases) or
    ``Qwen3ForCausalLM`` (3: q/k norms) of `qwen_hf_config` shape to `path`."""
    from transformers import Qwen2ForCausalLM, Qwen3ForCausalLM

    torch.manual_seed(seed)
    model_cls = {2: Qwen2ForCausalLM, 3: Qwen3ForCausalLM}[version]
    model = model_cls(qwen_hf_config(version, **config)).eval()
    return _save(model, path, seed, max_shard_size)


def save_phi3(path: Path, *, seed: int = 0, max_shard_size: str | None = None, **config) -> Path:
    """Saves a random ``Phi3ForCausalLM`` (fused qkv_proj and gate_up_proj tensors)."""
    from transformers import Phi3ForCausalLM

    torch.manual_seed(seed)
    model = Phi3ForCausalLM(phi3_hf_config(**config)).eval()
    return _save(model, path, seed, max_shard_size)


def save_gemma(path: Path, *, seed: int = 0, max_shard_size: str | None = None, **config) -> Path:
    """Saves a random ``GemmaForCausalLM`` of `gemma_hf_config` shape."""
    from transformers import GemmaForCausalLM

    torch.manual_seed(seed)
    model = GemmaForCausalLM(gemma_hf_config(**config)).eval()
    # Embeddings scaled by sqrt(hidden) = 8 and a tied LM head: at this init the random model
    # echoes its last input token forever; a 4x smaller table makes greedy tokens vary, so
    # the greedy tests compare something.
    with torch.no_grad():
        model.model.embed_tokens.weight.div_(4)
    return _save(model, path, seed, max_shard_size)


def save_opt(path: Path, *, seed: int = 0, max_shard_size: str | None = None, **config) -> Path:
    """Saves a random ``OPTForCausalLM`` (2 layers, hidden 64, tied LM head) to `path`."""
    from transformers import OPTForCausalLM

    torch.manual_seed(seed)
    model = OPTForCausalLM(opt_hf_config(**config)).eval()
    return _save(model, path, seed, max_shard_size)


def load_hf(path: Path, dtype: torch.dtype = torch.float32):
    """The saved model back through transformers (the parity reference), in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


def save_tokenizer(
    path: Path, *, vocab_size: int = TOKENIZER_VOCAB_SIZE, chat_template: str | None = None
) -> Path:
    """Trains a byte-level BPE on `CORPUS` and writes ``tokenizer.json`` and
    ``tokenizer_config.json`` (bos ``<s>`` = 1, eos ``</s>`` = 2, add_bos_token) to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    config: dict[str, Any] = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path
