"""Writes the peer benchmark's model: a random HF-format Llama directory (config.json +
model.safetensors, bf16) that both distserve_rt and vLLM-CPU load the same way.

The shape is issue 16's: 8 layers, hidden 1024, 16 query / 4 key-value heads (GQA),
intermediate 2816, vocab 32000, untied LM head. The tokenizer is a word-level
``tokenizer.json`` (token ``i`` is the word ``w<i>``) that both load through HF
``tokenizers``; the benchmark gives both engines token ids, so its cost is detokenisation
only, the same for both.

Run: ``python bench/peer/make_model.py /tmp/peer-llama``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
    "dtype": "bfloat16",
}


def make_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights (std 0.02 as HF initialises Llama; norms near 1) in bf16."""
    gen = torch.Generator().manual_seed(seed)
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d = config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)

    def norm() -> torch.Tensor:
        return (1.0 + torch.randn(h, generator=gen) * 0.05).to(torch.bfloat16)

    weights = {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": norm()}
    weights["lm_head.weight"] = rand(v, h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights[p + "self_attn.q_proj.weight"] = rand(q, h)
        weights[p + "self_attn.k_proj.weight"] = rand(kv, h)
        weights[p + "self_attn.v_proj.weight"] = rand(kv, h)
        weights[p + "self_attn.o_proj.weight"] = rand(h, q)
        weights[p + "mlp.gate_proj.weight"] = rand(f, h)
        weights[p + "mlp.up_proj.weight"] = rand(f, h)
        weights[p + "mlp.down_proj.weight"] = rand(h, f)
        weights[p + "input_layernorm.weight"] = norm()
        weights[p + "post_attention_layernorm.weight"] = norm()
    return weights


def save_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer over ``<unk> <s> </s> w3 .. w<vocab_size - 1>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.save(str(path / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096, **special}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def make_model(path: Path, seed: int = 0) -> Path:
    """Writes the model to `path` (created); returns `path`."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(CONFIG, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    save_file(make_weights(CONFIG, seed), str(path / "model.safetensors"), {"format": "pt"})
    save_tokenizer(path, CONFIG["vocab_size"])
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_model(args.path, args.seed))


if __name__ == "__main__":
    main()
