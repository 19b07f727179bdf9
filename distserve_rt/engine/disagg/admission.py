"""Admitting a request to the disaggregated controller: the checks the colocated engine
makes (params against the model, prompt ids) and the request's stop checker (detokenizer +
stop rules, run by the controller)."""

from __future__ import annotations

from collections.abc import Sequence

from distserve_rt.core.detokenizer import IncrementalDetokenizer
from distserve_rt.core.request import Request
from distserve_rt.core.stop_checker import StopChecker
from distserve_rt.engine.disagg.tracking import TrackedRequest
from distserve_rt.engine.request_checks import check_request
from distserve_rt.models.config import ModelConfig
from distserve_rt.sampling_params import SamplingParams
from distserve_rt.tokenizer import Tokenizer


def admit(
    request_id: str,
    prompt: str | None,
    prompt_token_ids: Sequence[int],
    params: SamplingParams,
    arrival_time: float,
    stream: bool,
    *,
    model_config: ModelConfig,
    max_model_len: int,
    tokenizer: Tokenizer | None,
) -> TrackedRequest:
    """The controller's record of a valid request (phase PREFILLING, not dispatched).
    Raises ValueError for invalid input (stop strings without a tokenizer included)."""
    ids, params = check_request(request_id, prompt, prompt_token_ids, params, model_config)
    # seq_id is the block manager's key: the controller holds no KV, so 0 for all.
    request = Request(request_id, 0, ids, params, arrival_time, max_model_len, prompt=prompt)
    request.stop_checker = make_stop_checker(params, ids, model_config, max_model_len, tokenizer)
    if params.logprobs is not None:
        request.logprobs = []
    return TrackedRequest(request, stream)


def make_stop_checker(
    params: SamplingParams,
    prompt_ids: list[int],
    model_config: ModelConfig,
    max_model_len: int,
    tokenizer: Tokenizer | None,
) -> StopChecker | None:
    """The request's detokenizer + stop rules, run by the controller on the streamed tokens.

    Why there and not in the decode instance: the controller sees every token of a request
    in order (the first from prefill, the rest from decode, again after a retry), already
    holds the tokenizer, and builds the outputs; the instances keep deciding EOS / stop ids
    / length on token ids (the same rules, so both sides agree), and a stop string, which
    only the text reveals, makes the controller abort the request on its instance.
    None when the prompt leaves no room for output (the prefill instance rejects it).
    """
    if len(prompt_ids) >= max_model_len:
        return None
    detokenizer = None
    if tokenizer is not None:
        detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
    return StopChecker(
        params,
        eos_token_id=model_config.eos_token_id,
        num_prompt_tokens=len(prompt_ids),
        max_model_len=max_model_len,
        detokenizer=detokenizer,
    )
