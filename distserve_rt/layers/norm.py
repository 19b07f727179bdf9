"""Normalisations: RMSNorm (Llama) and LayerNorm (OPT), replicated on every TP rank.

Both take ``[num_tokens, hidden_size]`` and return the same shape and dtype. RMSNorm
normalises in float32 and casts back before the weight multiply, exactly as HF Llama does,
so bf16 results round the same way as the reference.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from distserve_rt.layers.weight_utils import default_weight_loader


def _replicated_param(size: int, fill: float, dtype: torch.dtype, device: Any):
    param = torch.nn.Parameter(torch.full((size,), fill, dtype=dtype, device=device), False)
    param.weight_loader = default_weight_loader
    param.shard_ids = (None,)
    return param


class RMSNorm(torch.nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight``."""

    def __init__(self, hidden_size: int, eps: float, *, dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.eps = eps
        self.weight = _replicated_param(hidden_size, 1.0, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


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
