"""Parallel sampling (``n > 1``, ``best_of``): one request, several sequences.

The engine turns a request whose `SamplingParams.num_sequences` is k > 1 into k `Request`s:
the request itself (sequence 0, the one the scheduler admits and prefills) and k - 1 forks
in its ``Request.forks``, which the scheduler forks off its blocks when the prompt's
prefill completes (see `core.scheduler.base`). The disaggregated controller fans the
request out instead (as vLLM v1 does): k ordinary n == 1 child requests with the same ids
and parameters, each prefilled, migrated and decoded on its own. This module builds the
sequences' ids and sampling parameters and folds the sequences back into one
`RequestOutput`, for both engines.

Sequence i samples with its own parameters (vLLM's semantics):

* a seeded request's sequence i uses seed ``(seed + i) mod 2**64``: each sequence is
  reproducible, sequence 0 is exactly the ``n == 1`` output, and the others differ;
* greedy sequences are k identical copies (as in vLLM);
* with ``best_of > n`` every sequence records its sampled tokens' logprobs (the ranking
  needs them; they are returned only when the caller asked), and the n sequences with
  the highest cumulative logprob are returned, best first, as indices 0..n-1. While such
  a request runs, its streamed outputs show all best_of sequences by index (the ranking
  exists only at the end: the OpenAI server refuses to stream it, as vLLM does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from distserve_rt.core.request import Request
from distserve_rt.outputs import CompletionOutput, RequestMetrics, RequestOutput
from distserve_rt.sampling_params import MAX_SEED, SamplingParams


def sequence_ids(
    request_id: str, params: SamplingParams, max_num_seqs: int, in_use: Callable[[str], bool]
) -> list[str]:
    """The scheduler's ids of the request's sequences: `request_id`, then
    ``{request_id}#{i}``. ValueError when they cannot all run at once (more than
    `max_num_seqs`) or one is `in_use` (a live request's id)."""
    num_seqs = params.num_sequences
    if num_seqs > max_num_seqs:
        name = "n" if params.best_of is None else "best_of"
        raise ValueError(
            f"request {request_id!r}: {name}={num_seqs}; at most max_num_seqs="
            f"{max_num_seqs} sequences run at once"
        )
    ids = [request_id] + [f"{request_id}#{i}" for i in range(1, num_seqs)]
    for seq_id in ids[1:]:
        if in_use(seq_id):
            raise ValueError(f"request_id {seq_id!r} (a sequence of {request_id!r}) is in use")
    return ids


def sequence_params(params: SamplingParams, index: int) -> SamplingParams:
    """What sequence `index` of a request with `params` samples with: one sequence each,
    its derived seed, and logprobs on when best_of ranks the sequences."""
    seed = None if params.seed is None else (params.seed + index) % (MAX_SEED + 1)
    logprobs = params.logprobs
    if params.num_sequences > params.n and logprobs is None:
        logprobs = 0  # the sampled token's logprob only: what the ranking sums
    return dataclasses.replace(params, n=1, best_of=None, seed=seed, logprobs=logprobs)


class SequenceGroup:
    """The sequences of one request (index order) and the caller's parameters."""

    __slots__ = ("params", "sequences")

    def __init__(self, params: SamplingParams, sequences: list[Request]) -> None:
        self.params = params
        self.sequences = sequences
        for index, sequence in enumerate(sequences):
            sequence.seq_index = index

    @property
    def request(self) -> Request:
        """Sequence 0: the request the caller added."""
        return self.sequences[0]

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.sequences)

    def output(self, tokenizer: Any = None, metrics: RequestMetrics | None = None) -> RequestOutput:
        """One `RequestOutput` with a `CompletionOutput` per returned sequence: all of them
        in index order while running, the top n by cumulative logprob once finished;
        `tokenizer` (the engine's) decodes the logprobs' tokens; `metrics`: sequence 0's
        as the disaggregated controller measures them (default: from its `Request`)."""
        keep_logprobs = self.params.logprobs is not None
        completions = [
            CompletionOutput.from_request(s, s.seq_index, keep_logprobs, tokenizer)
            for s in self.sequences
        ]
        finished = self.is_finished
        if finished and len(completions) > self.params.n:
            completions.sort(key=_ranking_key, reverse=True)
            del completions[self.params.n :]
            for index, completion in enumerate(completions):
                completion.index = index
        first = self.request
        errors = [s.error for s in self.sequences if s.error is not None]
        return RequestOutput(
            request_id=first.request_id,
            prompt=first.prompt,
            prompt_token_ids=first.prompt_token_ids,
            outputs=completions,
            finished=finished,
            metrics=metrics or RequestMetrics.from_request(first),
            error=errors[0] if errors else None,
        )


def _ranking_key(completion: CompletionOutput) -> tuple[float, int]:
    # Ties (greedy copies) keep index order: the lower index ranks higher.
    cumulative = completion.cumulative_logprob
    return (float("-inf") if cumulative is None else cumulative, -completion.index)
