"""Qwen3 (dense): Llama's layers plus an RMSNorm over each head of q and k before RoPE
(HF ``self_attn.q_norm`` / ``k_norm``, one ``[head_dim]`` weight shared by all heads, so
replicated on every TP rank). Its ``head_dim`` is a config field, not hidden / heads.

Qwen2/2.5 need no class of their own: they are `LlamaForCausalLM` with q/k/v biases
(`ModelConfig.qkv_bias`).
"""

from __future__ import annotations

from typing import Any

import torch

from distserve_rt.distributed.parallel_state import ParallelContext
from distserve_rt.layers.norm import RMSNorm
from distserve_rt.models.config import ModelConfig
from distserve_rt.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class Qwen3Attention(LlamaAttention):
    def __init__(self, config: ModelConfig, parallel: ParallelContext, dtype, device) -> None:
        super().__init__(config, parallel, dtype, device)
        norm: dict[str, Any] = dict(dtype=dtype, device=device)
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps, **norm)
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps, **norm)

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor):
        """Each head of ``q [num_tokens, heads, head_dim]`` and ``k`` normalised on its own
        (rows of ``[num_tokens * heads, head_dim]``); new dense tensors of the same shape."""
        return _per_head(self.q_norm, q), _per_head(self.k_norm, k)


def _per_head(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    # x is a slice of the packed qkv output (token stride > heads * head_dim), so reshape
    # copies it into the dense rows the norm kernel reads.
    return norm(x.reshape(-1, x.shape[-1])).view(x.shape)


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3ForCausalLM(LlamaForCausalLM):
    decoder_layer_cls = Qwen3DecoderLayer

    @classmethod
    def layer_entries(cls, config: ModelConfig) -> list[tuple[str, str, Any, tuple[int, ...]]]:
        norms = [
            (f"self_attn.{n}.weight", f"self_attn.{n}.weight", None, (config.head_dim,))
            for n in ("q_norm", "k_norm")
        ]
        return super().layer_entries(config) + norms
