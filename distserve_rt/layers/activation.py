"""Activations of the MLPs: SwiGLU's SiluAndMul (Llama) and ReLU (OPT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distserve_rt.ops import layer_ops


class SiluAndMul(torch.nn.Module):
    """``[.., 2 * d] -> [.., d]``: ``silu(x[.., :d]) * x[.., d:]`` (gate first, then up, the
    order `MergedColumnParallelLinear` stores them in). One native op on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cpu and x.dim() == 2 and x.is_contiguous():
            return layer_ops.silu_and_mul(x)
        return layer_ops.reference_silu_and_mul(x)


class ReLU(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)
