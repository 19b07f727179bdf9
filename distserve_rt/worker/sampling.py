"""The runner's sampling function: logits of the needed rows -> one token per request.

A thin adapter from the engine's `Request`s to `layers.sampler.Sampler`: it builds the
step's `SamplingMetadata` (params, generated-token counts for min_tokens, per-request
generators) and hands back tokens and, when a row asked, its logprobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from distserve_rt.layers.sampler import Sampler
from distserve_rt.layers.sampling_metadata import (
    SamplingMetadata,
    make_generator,
    restore_generator,
)
from distserve_rt.logprobs import Logprob
from distserve_rt.sampling_params import SamplingParams


class SamplingRequest(Protocol):
    """What sampling reads of a request: `core.request.Request` in the engine process, a
    small per-request record in a remote sampling worker (`worker.worker_process`)."""

    sampling_params: SamplingParams
    generator: torch.Generator | None
    """Made here on first use for a seeded request, then kept by the request."""
    generator_state: bytes | None
    """A migrated stream: restored into `generator` on first use instead of seeding."""

    @property
    def num_output_tokens(self) -> int: ...


@dataclass(slots=True)
class SampledTokens:
    token_ids: torch.Tensor
    """int64 [n], on the logits' device."""
    logprobs: list[dict[int, Logprob]] | None = None
    """Per row: {token id: Logprob} of the sampled token and the top-k the request asked
    for (vLLM's shape; decoded_token is filled where outputs are made); None when no row
    asked."""


class RequestSampler:
    """Samples one token per request row with `Sampler`.

    Args:
        eos_token_id: suppressed (with stop_token_ids) until a request's min_tokens.
        vocab_size: columns of the logits.
        device: where the logits are (and the requests' generators are made).
    """

    def __init__(
        self,
        eos_token_id: int | None,
        vocab_size: int,
        device: torch.device,
        seed: int | None = None,
    ) -> None:
        self._sampler = Sampler()
        # Unseeded requests draw from one engine-wide stream, seeded by EngineConfig.seed so
        # two engines with the same seed and the same requests give the same tokens.
        self._batch_generator = None if seed is None else make_generator(seed, device)
        self._eos_token_id = eos_token_id
        self._vocab_size = vocab_size
        self._device = device

    def __call__(self, logits: torch.Tensor, requests: Sequence[SamplingRequest]) -> SampledTokens:
        """``logits`` float32 [n, vocab_size] (overwritten) and the n requests, row order."""
        generators = []
        for r in requests:
            if r.generator is None:
                r.generator = self._first_generator(r)
            generators.append(r.generator)
        metadata = SamplingMetadata.build(
            [r.sampling_params for r in requests],
            [r.num_output_tokens for r in requests],
            generators,
            eos_token_id=self._eos_token_id,
            vocab_size=self._vocab_size,
            device=self._device,
            batch_generator=self._batch_generator,
        )
        out = self._sampler(logits, metadata)
        if out.logprobs is None:
            return SampledTokens(out.token_ids)
        return SampledTokens(out.token_ids, _logprob_dicts(out, requests))

    def _first_generator(self, r: SamplingRequest) -> torch.Generator | None:
        """Made once per request: its stream continues across steps and preemptions, and
        across instances (a migrated request continues the stream its prefill drew from)."""
        if r.generator_state is not None:
            generator = restore_generator(r.generator_state, self._device)
            r.generator_state = None
            return generator
        seed = r.sampling_params.seed
        return None if seed is None else make_generator(seed, self._device)


def _logprob_dicts(out, requests: Sequence[SamplingRequest]) -> list[dict[int, Logprob]]:
    """vLLM's rows: the sampled token (ranked by how many tokens are more likely), then the
    top k ranked 1..k; a sampled token among them keeps its top-k rank (as vLLM's)."""
    lp = out.logprobs
    sampled = out.token_ids.tolist()
    sampled_lp, sampled_rank = lp.sampled_logprobs.tolist(), lp.sampled_ranks.tolist()
    top_ids, top_lp = lp.topk_token_ids.tolist(), lp.topk_logprobs.tolist()
    rows = []
    for i, r in enumerate(requests):
        k = r.sampling_params.logprobs or 0
        row = {sampled[i]: Logprob(sampled_lp[i], sampled_rank[i])}
        for rank in range(1, k + 1):
            row[top_ids[i][rank - 1]] = Logprob(top_lp[i][rank - 1], rank)
        rows.append(row)
    return rows
