"""Engine logprobs -> the two OpenAI shapes.

The engine gives, per generated token, ``{token id: logprob}`` holding the sampled token and
the top ``SamplingParams.logprobs`` tokens (`CompletionOutput.logprobs`). Token text is the
token decoded alone with special tokens kept, so every id has a visible string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from distserve_rt.entrypoints.openai.responses import (
    ChatLogProbs,
    ChatTokenLogprob,
    CompletionLogProbs,
    TopLogprob,
)


def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _sampled_and_top(
    row: dict[int, float], token_id: int, num_top: int
) -> tuple[float, list[tuple[int, float]]]:
    if token_id not in row:
        raise RuntimeError(
            f"the engine's logprobs for a token lack the sampled token {token_id} "
            f"(got ids {sorted(row)})"
        )
    top = sorted(row.items(), key=lambda kv: kv[1], reverse=True)[:num_top]
    return row[token_id], top


def completion_logprobs(
    tokenizer: Any,
    token_ids: Sequence[int],
    rows: Sequence[dict[int, float]],
    num_top: int,
    text_offset: int,
) -> CompletionLogProbs:
    """`token_ids` and `rows` are the new tokens of one chunk (or all of them); offsets
    count characters from the start of the generated text, from `text_offset`."""
    out = CompletionLogProbs()
    for token_id, row in zip(token_ids, rows, strict=True):
        sampled, top = _sampled_and_top(row, token_id, num_top)
        text = _token_text(tokenizer, token_id)
        out.tokens.append(text)
        out.token_logprobs.append(sampled)
        out.top_logprobs.append({_token_text(tokenizer, t): lp for t, lp in top})
        out.text_offset.append(text_offset)
        text_offset += len(text)
    return out


def chat_logprobs(
    tokenizer: Any, token_ids: Sequence[int], rows: Sequence[dict[int, float]], num_top: int
) -> ChatLogProbs:
    content = []
    for token_id, row in zip(token_ids, rows, strict=True):
        sampled, top = _sampled_and_top(row, token_id, num_top)
        text = _token_text(tokenizer, token_id)
        content.append(
            ChatTokenLogprob(
                token=text,
                logprob=sampled,
                bytes=list(text.encode("utf-8")),
                top_logprobs=[_top(tokenizer, t, lp) for t, lp in top],
            )
        )
    return ChatLogProbs(content=content)


def _top(tokenizer: Any, token_id: int, logprob: float) -> TopLogprob:
    text = _token_text(tokenizer, token_id)
    return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))
