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


def _sampler(device: torch.device) -> RequestSampler:
    return RequestSampler(eos_token_id=None, vocab_size=VOCAB, device=device)


def _logits(step: int, device: torch.device) -> torch.Tensor:
    # float32 [1, VOCAB]: flat enough that every draw depends on the stream.
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(step)) * 0.1
    return logits.to(device)


def _draw(sampler: RequestSampler, request: SamplingState, step: int, device: torch.device) -> int:
    token = int(sampler(_logits(step, device), [request]).token_ids[0])
    request.num_output_tokens += 1
    return token


def test_restored_stream_continues_where_the_first_sampler_stopped(device):
    # On CUDA the state is the device generator's (seed + offset), restored on the device.
    alone = SamplingState(PARAMS)  # one sampler draws every token (colocated)
    sampler = _sampler(device)
    want = [_draw(sampler, alone, step, device) for step in range(NUM_STEPS)]

    prefilled = SamplingState(PARAMS)
    first = _draw(_sampler(device), prefilled, 0, device)
    state = generator_state(prefilled.generator)  # type: ignore[arg-type]
    migrated = SamplingState(PARAMS, generator_state=state, num_output_tokens=1)
    decode = _sampler(device)
    rest = [_draw(decode, migrated, step, device) for step in range(1, NUM_STEPS)]

    assert [first, *rest] == want
    assert migrated.generator_state is None  # consumed once, then the generator is kept
    assert migrated.generator.device.type == device.type  # type: ignore[union-attr]
    # Re-seeding instead (the stream restarts) gives other tokens: the equality above is
    # not trivial.
    restarted = SamplingState(PARAMS, num_output_tokens=1)
    other = _sampler(device)
    assert [_draw(other, restarted, step, device) for step in range(1, NUM_STEPS)] != rest
