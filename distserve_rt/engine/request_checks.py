"""Admission checks that depend on the model, shared by every engine that takes requests
(`LLMEngine` and the disaggregated controller, both through `check_request`), so a bad
request fails when it is added rather than in the sampler or a native kernel, where it
would fail a whole step and every request batched beside it.

What is checked here is what the step would choke on: token ids outside the vocabulary
(the embedding lookup indexes with them), stop ids the sampler's suppression indexes with,
a suppression set that masks every token (the row's probabilities become NaN and the
sampler returns an id outside the vocabulary), and an empty prompt. `SamplingParams`
checks what does not depend on the model (seed range, temperature, lengths) on its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from distserve_rt.models.config import ModelConfig
from distserve_rt.sampling_params import SamplingParams

MAX_LOGPROBS = 20
"""Top logprobs a request may ask for (vLLM's default max_logprobs)."""


def check_request(
    request_id: str,
    prompt: str | None,
    prompt_token_ids: Sequence[int],
    params: SamplingParams,
    model_config: ModelConfig,
) -> tuple[list[int], SamplingParams]:
    """Every admission check of one request: returns the prompt ids as a list and the
    params with the model's extra EOS ids added; ValueError naming the field otherwise."""
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise ValueError(
            f"request {request_id!r}: prompt must be a non-empty string (or None with "
            f"prompt_token_ids), got {prompt!r}"
        )
    if not isinstance(params, SamplingParams):
        raise ValueError(
            f"request {request_id!r}: sampling_params must be a SamplingParams, got "
            f"{type(params).__name__}"
        )
    ids = check_token_ids(request_id, prompt_token_ids, model_config.vocab_size)
    return ids, check_sampling_params(request_id, params, model_config)


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
    _check_suppression(request_id, params, model_config)
    extra = [t for t in model_config.extra_eos_token_ids if t not in params.stop_token_ids]
    if extra and not params.ignore_eos:
        params = dataclasses.replace(params, stop_token_ids=params.stop_token_ids + extra)
    return params


def _check_suppression(request_id: str, params: SamplingParams, model_config: ModelConfig) -> None:
    # Until min_tokens, EOS and the stop ids are masked to -inf; masking the whole
    # vocabulary leaves nothing to sample (NaN probabilities, an id outside the vocabulary).
    if params.min_tokens == 0:
        return
    suppressed = set(params.stop_token_ids)
    if model_config.eos_token_id is not None:
        suppressed.add(model_config.eos_token_id)
    if len(suppressed) >= model_config.vocab_size:
        raise ValueError(
            f"request {request_id!r}: stop_token_ids with min_tokens={params.min_tokens} "
            f"suppress all {model_config.vocab_size} tokens of the vocabulary; leave at "
            "least one token that may be sampled"
        )
