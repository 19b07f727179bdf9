"""Parallel sampling (``n > 1``, ``best_of``) on the disaggregated controller: the parent
request fans out into child requests, as vLLM v1 does.

Why children and not forks: forked sequences would share the prompt's KV blocks, which
would have to migrate once and be forked on the decode instance. A child is an ordinary
``n == 1`` request (prefill -> migrate -> decode, the failure rules included), so nothing
in the instances or the migration protocol changes; with prefix caching the prefill
instance reuses the prompt blocks of the children it finds cached.

The children's ids, sampling parameters (derived seeds, logprobs for the best_of ranking)
and the gathered output are `engine.parallel_sampling`'s, the colocated engine's own, so
both engines name, sample and present the sequences alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from distserve_rt.engine.disagg import admission
from distserve_rt.engine.disagg.tracking import TrackedRequest
from distserve_rt.engine.parallel_sampling import SequenceGroup, sequence_ids, sequence_params
from distserve_rt.outputs import RequestOutput
from distserve_rt.sampling_params import SamplingParams


class FanOut:
    """A parent request's child requests (index order) and their `SequenceGroup`."""

    __slots__ = ("children", "group")

    def __init__(self, params: SamplingParams, children: list[TrackedRequest]) -> None:
        self.children = children
        self.group = SequenceGroup(params, [c.request for c in children])

    @property
    def request_id(self) -> str:
        """The parent's id: child 0's (the other children are ``{id}#{i}``)."""
        return self.children[0].request_id

    @property
    def stream(self) -> bool:
        return self.children[0].stream

    @property
    def is_finished(self) -> bool:
        return self.group.is_finished

    def output(self, tokenizer: Any = None) -> RequestOutput:
        """The parent's output, as the colocated engine presents a group (ranked and
        trimmed to n once every child finished); metrics are child 0's, as there."""
        return self.group.output(tokenizer, self.children[0].metrics())


def fan_out(
    request_id: str,
    prompt: str | None,
    prompt_token_ids: Sequence[int],
    params: SamplingParams,
    arrival_time: float,
    stream: bool,
    *,
    max_num_seqs: int,
    in_use: Callable[[str], bool],
    **admit_kwargs: Any,
) -> FanOut:
    """Admits every child of the request (none dispatched). ValueError, before any child
    exists, for invalid input, too many sequences, or a child id `in_use`; `admit_kwargs`
    go to `admission.admit`."""
    ids = sequence_ids(request_id, params, max_num_seqs, in_use)
    children = [
        admission.admit(
            child_id,
            prompt,
            prompt_token_ids,
            sequence_params(params, index),
            arrival_time,
            stream,
            **admit_kwargs,
        )  # fmt: skip
        for index, child_id in enumerate(ids)
    ]
    return FanOut(params, children)
