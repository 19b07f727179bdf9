"""`Logprob`, vLLM's type for one token's log-probability, and the per-position shape
outputs carry (``SampleLogprobs``: one ``{token id: Logprob}`` per generated token, holding
the sampled token and the top ``SamplingParams.logprobs`` ones)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(slots=True)
class Logprob:
    """One token's log-probability at one position, as vLLM's ``Logprob``."""

    logprob: float
    """Natural log of the token's probability under the raw logits (before temperature,
    penalties or truncation: vLLM's default ``raw_logprobs``)."""
    rank: int | None = None
    """1 for the most likely token of the vocabulary; the top tokens are ranked 1..k and
    the sampled one by how many tokens are more likely (+1)."""
    decoded_token: str | None = None
    """The token decoded alone with special tokens kept; None when the engine runs
    without a tokenizer."""


SampleLogprobs = list[dict[int, Logprob]]
"""Per generated token: {token id: Logprob} of the sampled token and the top-k asked for."""


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


def fill_decoded_tokens(rows: Sequence[dict[int, Logprob]], tokenizer: _Decoder | None) -> None:
    """Sets ``decoded_token`` of the rows not decoded yet. Rows are decoded in order, so the
    walk goes back from the last one and stops at the first decoded: each output step costs
    its new rows only."""
    if tokenizer is None:
        return
    for row in reversed(rows):
        if all(lp.decoded_token is not None for lp in row.values()):
            return
        for token_id, lp in row.items():
            if lp.decoded_token is None:
                lp.decoded_token = tokenizer.decode([token_id], skip_special_tokens=False)
