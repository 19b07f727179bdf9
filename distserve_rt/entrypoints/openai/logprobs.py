"""Engine logprobs -> the two OpenAI shapes.

The engine gives, per generated token, ``{token id: Logprob}`` holding the sampled token and
the top ``SamplingParams.logprobs`` tokens (`CompletionOutput.logprobs`, vLLM's type). Token
text is the token decoded alone with special tokens kept (the Logprob's decoded_token when
the engine filled it), so every id has a visible string.
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
from distserve_rt.logprobs import Logprob


def _token_text(tokenizer: Any, token_id: int, logprob: Logprob | None = None) -> str:
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _sampled_and_top(
    row: dict[int, Logprob], token_id: int, num_top: int
) -> tuple[Logprob, list[tuple[int, Logprob]]]:
    if token_id not in row:
        raise RuntimeError(
            f"the engine's logprobs for a token lack the sampled token {token_id} "
            f"(got ids {sorted(row)})"
        )
    top = sorted(row.items(), key=lambda kv: kv[1].logprob, reverse=True)[:num_top]
    return row[token_id], top


def completion_logprobs(
    tokenizer: Any,
    token_ids: Sequence[int],
    rows: Sequence[dict[int, Logprob]],
    num_top: int,
    text_offset: int,
) -> CompletionLogProbs:
    """`token_ids` and `rows` are the new tokens of one chunk (or all of them); offsets
    count characters from the start of the generated text, from `text_offset`."""
    out = CompletionLogProbs()
    for token_id, row in zip(token_ids, rows, strict=True):
        sampled, top = _sampled_and_top(row, token_id, num_top)
        text = _token_text(tokenizer, token_id, sampled)
        out.tokens.append(text)
        out.token_logprobs.append(sampled.logprob)
        out.top_logprobs.append({_token_text(tokenizer, t, lp): lp.logprob for t, lp in top})
        out.text_offset.append(text_offset)
        text_offset += len(text)
    return out


def chat_logprobs(
    tokenizer: Any, token_ids: Sequence[int], rows: Sequence[dict[int, Logprob]], num_top: int
) -> ChatLogProbs:
    content = []
    for token_id, row in zip(token_ids, rows, strict=True):
        sampled, top = _sampled_and_top(row, token_id, num_top)
        text = _token_text(tokenizer, token_id, sampled)
        content.append(
            ChatTokenLogprob(
                token=text,
                logprob=sampled.logprob,
                bytes=list(text.encode("utf-8")),
                top_logprobs=[_top(tokenizer, t, lp) for t, lp in top],
            )
        )
    return ChatLogProbs(content=content)


def _top(tokenizer: Any, token_id: int, logprob: Logprob) -> TopLogprob:
    text = _token_text(tokenizer, token_id, logprob)
    return TopLogprob(token=text, logprob=logprob.logprob, bytes=list(text.encode("utf-8")))
