"""A readable per-row reference of the sampling distribution (vLLM's positional rules)."""

from __future__ import annotations

import torch

from distserve_rt.sampling_params import SamplingParams


def reference_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``logits [vocab]`` -> the distribution the sampler must draw from (float64)."""
    logits = logits.double()
    if params.greedy:
        out = torch.zeros_like(logits)
        out[logits.argmax()] = 1.0
        return out
    probs = torch.softmax(logits / params.temperature, dim=-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if params.min_p > 0:
        keep &= probs >= params.min_p * probs.max()
    order = torch.argsort(probs, descending=True)
    if 0 < params.top_k < len(probs):
        keep[order[params.top_k :]] = False
    probs = torch.where(keep, probs, 0.0)
    probs /= probs.sum()
    if params.top_p < 1.0:
        mass_before = 0.0
        for token in order.tolist():
            if mass_before >= params.top_p:
                probs[token] = 0.0
            mass_before += float(probs[token])
        probs /= probs.sum()
    return probs
