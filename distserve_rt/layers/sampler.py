"""Batched token sampling from the last-position logits of every request in a step.

Order of operations (vLLM v1's):
  1. logprobs, when any row asks, from the *raw* logits: ``log_softmax(logits)`` before
     min_tokens, temperature or any truncation (vLLM's default ``raw_logprobs`` mode). They
     describe the model's own distribution, not the one the token was drawn from.
  2. min_tokens: EOS and stop token ids of rows still short of min_tokens get -inf.
  3. greedy rows: argmax. Done if every row is greedy.
  4. temperature, then min-p and top-k on the logits, softmax, then top-p on the
     probabilities (`truncation.py`).
  5. inverse-CDF sampling: one uniform ``u`` per row, token = first index whose cumulative
     probability exceeds ``u * total``. A seeded row draws its ``u`` from its own generator,
     so its tokens do not depend on the rest of the batch; the other rows share one draw.

Why not vLLM's exponential race (``argmax(probs / q)``, ``q ~ Exp(1)``)? It draws a whole
vocabulary of noise per row: 155 ms for 256 x 32000 on two CPU cores, against well under
1 ms for one uniform per row plus a cumsum. Per seeded row it is one scalar draw instead
of ``vocab`` draws. The cumsum is float32; its rounding (relative ~1e-7 per add) shifts
tail probabilities slightly but never selects a zero-probability (masked) token.

Everything is batched on the logits' device; the only per-row Python loop is the seeded
rows' draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distserve_rt.layers.sampling_metadata import SamplingMetadata
from distserve_rt.layers.truncation import mask_min_p, mask_top_k, mask_top_p


@dataclass(slots=True)
class LogprobsTensors:
    """Raw-logit log-probabilities for each row (see the module docstring)."""

    sampled_logprobs: torch.Tensor
    """float32 ``[num_rows]``: log-probability of the sampled token."""
    sampled_ranks: torch.Tensor
    """int64 ``[num_rows]``: 1 + number of tokens strictly more likely than the sampled one."""
    topk_token_ids: torch.Tensor
    """int64 ``[num_rows, max_num_logprobs]``, most likely first; a row that asked for
    fewer uses the first ``SamplingParams.logprobs`` columns."""
    topk_logprobs: torch.Tensor
    """float32 ``[num_rows, max_num_logprobs]``."""


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor
    """int64 ``[num_rows]`` on the logits' device."""
    logprobs: LogprobsTensors | None
    """None when no row asked for logprobs."""


class Sampler:
    """Stateless; one instance serves every step."""

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        """``logits``: float32 ``[num_rows, vocab_size]``, one row per request, on the
        device of the metadata's tensors. It is used as scratch space and overwritten
        (as in vLLM): pass a clone if you still need it.
        """
        _check_logits(logits, metadata)
        raw_logprobs = None
        if metadata.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        if metadata.suppress_rows is not None:
            logits[metadata.suppress_rows, metadata.suppress_token_ids] = -torch.inf
        token_ids = _sample(logits, metadata)
        logprobs = None
        if raw_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, token_ids, metadata.max_num_logprobs or 0)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)


def _sample(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    if metadata.all_greedy:
        return logits.argmax(dim=-1)
    greedy_ids = None if metadata.all_random else logits.argmax(dim=-1)
    if metadata.temperature is None:
        raise RuntimeError("SamplingMetadata without temperature for sampled rows: use build()")
    logits.div_(metadata.temperature.unsqueeze(1))
    if metadata.min_p is not None:
        mask_min_p(logits, metadata.min_p)
    if metadata.top_k is not None:
        mask_top_k(logits, metadata.top_k, metadata.max_top_k)
    probs = torch.softmax(logits, dim=-1)
    if metadata.top_p is not None:
        mask_top_p(probs, metadata.top_p)
    uniform = _uniform_per_row(probs.shape[0], probs.device, metadata)
    sampled = inverse_cdf_sample(probs, uniform)
    if greedy_ids is None:
        return sampled
    return torch.where(metadata.greedy_mask, greedy_ids, sampled)


def _uniform_per_row(
    num_rows: int, device: torch.device, metadata: SamplingMetadata
) -> torch.Tensor:
    """float32 ``[num_rows]`` in [0, 1): seeded rows from their own generator."""
    uniform = torch.rand(num_rows, generator=metadata.batch_generator, device=device)
    if metadata.seeded_rows is not None:
        draws = [torch.rand(1, generator=g, device=device) for g in metadata.generators.values()]
        uniform[metadata.seeded_rows] = torch.cat(draws)
    return uniform


def inverse_cdf_sample(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs [num_rows, vocab]`` (non-negative, need not sum to 1;
    masked tokens 0) given ``uniform [num_rows]`` in [0, 1). Returns int64 ``[num_rows]``.

    The token is the first index whose cumulative sum exceeds ``uniform * total``; a token
    of probability 0 adds nothing to the cumsum, so it can never be that first index.
    """
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1]
    # u * total can round up to total itself, past every index; stay strictly below it.
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1)


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> LogprobsTensors:
    """``logprobs [num_rows, vocab]``, ``token_ids`` int64 ``[num_rows]``; ``num_top`` top
    tokens per row (0 = only the sampled token's)."""
    sampled = logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = (logprobs > sampled).sum(dim=-1) + 1
    top = logprobs.topk(num_top, dim=-1)
    return LogprobsTensors(
        sampled_logprobs=sampled.squeeze(1),
        sampled_ranks=ranks,
        topk_token_ids=top.indices,
        topk_logprobs=top.values,
    )


def _check_logits(logits: torch.Tensor, metadata: SamplingMetadata) -> None:
    expected = (metadata.num_rows, metadata.vocab_size)
    if logits.dim() != 2 or tuple(logits.shape) != expected:
        raise ValueError(f"logits must have shape {list(expected)}, got {list(logits.shape)}")
    if logits.dtype != torch.float32:
        raise ValueError(f"logits must be float32, got {logits.dtype}")
    tensor = metadata.temperature if metadata.temperature is not None else metadata.greedy_mask
    if tensor is not None and tensor.device != logits.device:
        raise ValueError(f"logits are on {logits.device}, the sampling metadata on {tensor.device}")
