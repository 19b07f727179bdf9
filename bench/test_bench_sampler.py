"""Sampler step at batch 256 x vocab 32000 with mixed parameters (the decode step's
sampling cost). Logits are Zipf-like (p ~ rank^-1.1 plus noise) like a language model's:
uniform random logits would make every top-p row's nucleus span most of the vocabulary,
which real models rarely do, and would time only the full-sort fallback."""

from __future__ import annotations

import pytest
import torch

from distserve_rt.layers.sampler import Sampler
from distserve_rt.layers.sampling_metadata import SamplingMetadata, make_generator
from distserve_rt.sampling_params import SamplingParams

NUM_ROWS, VOCAB = 256, 32000
MIXES = {
    "greedy": [SamplingParams(temperature=0.0)],
    "mixed": [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, top_p=0.95),
        SamplingParams(temperature=1.0, top_k=50, seed=7),
        SamplingParams(temperature=0.7, min_p=0.05, logprobs=5),
    ],
}


def _zipf_logits() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    ranks = torch.argsort(torch.rand(NUM_ROWS, VOCAB, generator=gen), dim=-1).float() + 1
    return -1.1 * ranks.log() + 0.3 * torch.randn(NUM_ROWS, VOCAB, generator=gen)


@pytest.mark.parametrize("mix", list(MIXES))
def test_sampler_step(benchmark, mix):
    """Metadata build + sampling of one step (the logits copy is outside the timing)."""
    params = [MIXES[mix][i % len(MIXES[mix])] for i in range(NUM_ROWS)]
    generators = [make_generator(p.seed, "cpu") if p.seed is not None else None for p in params]
    logits = _zipf_logits()
    sampler = Sampler()
    benchmark.extra_info.update(num_rows=NUM_ROWS, vocab=VOCAB, mix=mix)

    def setup():
        return (logits.clone(),), {}

    def step(scratch):
        meta = SamplingMetadata.build(
            params, [1] * NUM_ROWS, generators, eos_token_id=2, vocab_size=VOCAB, device="cpu"
        )
        return sampler(scratch, meta)

    out = benchmark.pedantic(step, setup=setup, rounds=10, warmup_rounds=1)
    assert out.token_ids.shape == (NUM_ROWS,)
