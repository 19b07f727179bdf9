"""Gemma (v1, ``GemmaForCausalLM``; CodeGemma): Llama's layers with three differences
that change every logit, each reproduced with HF's rounding:

* RMSNorm scales by ``1 + weight`` (checkpoints store the offset from 1), multiplied in
  float32 before the cast back (Llama casts first);
* the MLP gate is GELU (tanh approximation) instead of SiLU;
* token embeddings are multiplied by ``sqrt(hidden_size)``, rounded to the weights' dtype.

Gemma 2 and 3 (logit soft-capping, sliding-window layers) are other architectures and are
refused by `ModelConfig.from_hf_config`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distserve_rt.layers.norm import RMSNorm
from distserve_rt.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP


class GemmaRMSNorm(RMSNorm):
    """``x / sqrt(mean(x^2) + eps) * (1 + weight)`` in float32, cast to x's dtype; with a
    residual, ``(norm(x + residual), x + residual)`` as `RMSNorm` (eager torch: Gemma's
    rounding differs from the native Llama kernel's)."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            residual = x + residual
            x = residual
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = (xf * (1.0 + self.weight.float())).to(x.dtype)
        return out if residual is None else (out, residual)


class GeluTanhAndMul(torch.nn.Module):
    """``[.., 2 * d] -> [.., d]``: ``gelu_tanh(gate) * up`` (HF's ``gelu_pytorch_tanh``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.gelu(x[..., :d], approximate="tanh") * x[..., d:]


class GemmaMLP(LlamaMLP):
    act_cls = GeluTanhAndMul


class GemmaDecoderLayer(LlamaDecoderLayer):
    mlp_cls = GemmaMLP
    norm_cls = GemmaRMSNorm


class GemmaForCausalLM(LlamaForCausalLM):
    decoder_layer_cls = GemmaDecoderLayer

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        # HF rounds the scale to the weights' dtype first (sqrt(3072) is 55.5 in bf16).
        scale = torch.tensor(self.config.hidden_size**0.5, dtype=hidden.dtype)
        return hidden * scale.to(hidden.device)
