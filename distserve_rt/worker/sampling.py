"""The runner's sampling function: logits of the needed rows -> one token per request.

Until the sampler (`layers.sampler`, top-k/top-p/min-p, seeds, logprobs) lands, only greedy
requests are served; any other raises NotImplementedError rather than sampling differently
from what the request asked.
"""

from __future__ import annotations

import torch

from distserve_rt.core.request import Request


def greedy_sample(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """``logits`` float32 [n, vocab_size] -> int64 [n]: the argmax of each row."""
    for request in requests:
        if not request.sampling_params.greedy:
            raise NotImplementedError(
                f"request {request.request_id!r} asks for temperature="
                f"{request.sampling_params.temperature}: random sampling needs "
                "distserve_rt.layers.sampler, which is not merged yet; use temperature=0"
            )
    return logits.argmax(dim=-1)
