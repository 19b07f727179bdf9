"""Activations of the MLPs: SwiGLU's SiluAndMul (Llama) and ReLU (OPT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SiluAndMul(torch.nn.Module):
    """``[.., 2 * d] -> [.., d]``: ``silu(x[.., :d]) * x[.., d:]`` (gate first, then up, the
    order `MergedColumnParallelLinear` stores them in)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


class ReLU(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)
