"""A seeded request's stream moved between samplers (prefill instance -> decode instance,
or into a sampling worker process): `generator_state` bytes, restored by `RequestSampler`
at the request's first draw, continue the stream exactly."""

from __future__ import annotations

import torch

from distserve_rt.layers.sampling_metadata import generator_state
from distserve_rt.sampling_params import SamplingParams
from distserve_rt.worker.sampling import RequestSampler
from distserve_rt.worker.worker_process import SamplingState

VOCAB = 1000
PARAMS = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
NUM_STEPS = 5


def _sampler() -> RequestSampler:
    return RequestSampler(eos_token_id=None, vocab_size=VOCAB, device=torch.device("cpu"))


def _logits(step: int) -> torch.Tensor:
    # float32 [1, VOCAB]: flat enough that every draw depends on the stream.
    return torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(step)) * 0.1


def _draw(sampler: RequestSampler, request: SamplingState, step: int) -> int:
    token = int(sampler(_logits(step), [request]).token_ids[0])
    request.num_output_tokens += 1
    return token


def test_restored_stream_continues_where_the_first_sampler_stopped():
    alone = SamplingState(PARAMS)  # one sampler draws every token (colocated)
    sampler = _sampler()
    want = [_draw(sampler, alone, step) for step in range(NUM_STEPS)]

    prefilled = SamplingState(PARAMS)
    first = _draw(_sampler(), prefilled, 0)
    state = generator_state(prefilled.generator)  # type: ignore[arg-type]
    migrated = SamplingState(PARAMS, generator_state=state, num_output_tokens=1)
    decode = _sampler()
    rest = [_draw(decode, migrated, step) for step in range(1, NUM_STEPS)]

    assert [first, *rest] == want
    assert migrated.generator_state is None  # consumed once, then the generator is kept
    # Re-seeding instead (the stream restarts) gives other tokens: the equality above is
    # not trivial.
    restarted = SamplingState(PARAMS, num_output_tokens=1)
    other = _sampler()
    assert [_draw(other, restarted, step) for step in range(1, NUM_STEPS)] != rest
