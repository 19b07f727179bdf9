"""Admission checks that depend on the model, shared by every engine that takes requests
(`LLMEngine` and the disaggregated controller), so a bad request fails when it is added
rather than in the sampler, where it would fail a whole step."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from distserve_rt.models.config import ModelConfig
from distserve_rt.sampling_params import SamplingParams

MAX_LOGPROBS = 20
"""Top logprobs a request may ask for (vLLM's default max_logprobs)."""


def check_token_ids(request_id: str, token_ids: Sequence[int], vocab_size: int) -> list[int]:
    """The prompt as a list of ints in ``[0, vocab_size)``; ValueError otherwise."""
    ids = list(token_ids)
    if not ids:
        raise ValueError(f"request {request_id!r}: prompt_token_ids must not be empty")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise ValueError(
                f"request {request_id!r}: prompt_token_ids must be ints in [0, {vocab_size}), "
                f"got {t!r}"
            )
    return ids


def check_sampling_params(
    request_id: str, params: SamplingParams, model_config: ModelConfig
) -> SamplingParams:
    """Model-dependent checks (SamplingParams checks the rest on its own). Returns the
    params with the model's extra EOS ids added to the stop ids (unless ignore_eos)."""
    vocab_size = model_config.vocab_size
    for t in params.stop_token_ids:
        if t >= vocab_size:
            raise ValueError(
                f"request {request_id!r}: stop_token_ids must be in [0, {vocab_size}), got {t}"
            )
    if params.logprobs is not None and params.logprobs > MAX_LOGPROBS:
        raise ValueError(
            f"request {request_id!r}: logprobs must be <= {MAX_LOGPROBS}, got {params.logprobs}"
        )
    extra = [t for t in model_config.extra_eos_token_ids if t not in params.stop_token_ids]
    if extra and not params.ignore_eos:
        params = dataclasses.replace(params, stop_token_ids=params.stop_token_ids + extra)
    return params
