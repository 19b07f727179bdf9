"""Normalisations: RMSNorm (Llama) and LayerNorm (OPT), replicated on every TP rank.

Both take ``[num_tokens, hidden_size]`` and return the same shape and dtype. RMSNorm
normalises in float32 and casts back before the weight multiply, exactly as HF Llama does,
so bf16 results round the same way as the reference. On CPU it is one fused native op
(`ops.layer_ops.rms_norm`), with the decoder layer's residual add folded in (vLLM's
``fused_add_rms_norm``); on CUDA the same steps in eager torch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from distserve_rt.layers.weight_utils import default_weight_loader
from distserve_rt.ops import layer_ops


def _replicated_param(size: int, fill: float, dtype: torch.dtype, device: Any):
    param = torch.nn.Parameter(torch.full((size,), fill, dtype=dtype, device=device), False)
    param.weight_loader = default_weight_loader
    param.shard_ids = (None,)
    return param


class RMSNorm(torch.nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight``; with a residual, ``(x + residual)`` is
    normalised and returned as the new residual (``(out, residual)``)."""

    def __init__(self, hidden_size: int, eps: float, *, dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.eps = eps
        self.weight = _replicated_param(hidden_size, 1.0, dtype, device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``x [num_tokens, hidden]`` -> normalised x; with ``residual`` -> ``(normalised
        x + residual, x + residual)`` (the residual is updated in place on CPU)."""
        if x.is_cpu and x.dim() == 2:
            out = layer_ops.rms_norm(x, self.weight, self.eps, residual)
            return out if residual is None else (out, residual)
        out, new_residual = layer_ops.reference_rms_norm(x, self.weight, self.eps, residual)
        return out if residual is None else (out, new_residual)


class LayerNorm(torch.nn.Module):
    """``torch.nn.functional.layer_norm`` with weight and bias (elementwise affine)."""

    def __init__(self, hidden_size: int, eps: float, *, dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.eps = eps
        self.weight = _replicated_param(hidden_size, 1.0, dtype, device)
        self.bias = _replicated_param(hidden_size, 0.0, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
