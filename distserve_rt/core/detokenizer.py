"""Incremental detokenization: one text delta per generated token, in O(window) per token.

Only ``tokenizer.decode(ids, skip_special_tokens=...)`` is used, so any tokenizer with the
project's Tokenizer protocol works (HF fast tokenizers, byte-level test fakes).

The method is vLLM's ``detokenize_incrementally`` / TGI's ``decode_token`` over ids:
two offsets into the token ids, ``prefix_offset <= read_offset``. The text of
``ids[prefix_offset:read_offset]`` has already been emitted; decoding
``ids[prefix_offset:]`` and removing that prefix's text gives the new text. Decoding a few
tokens of context before the new ones keeps tokenizers that change a token's text by its
neighbours (SentencePiece's leading space) right, while never decoding the whole sequence.

Text that ends in U+FFFD is held back: the last tokens may be the first bytes of a
multi-byte UTF-8 character whose remaining bytes are in the next tokens. `flush` releases
what is still held when the request finishes (a genuinely broken sequence stays U+FFFD,
exactly as ``decode(all ids)`` would show it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# Prompt tokens decoded as context before the first output token (vLLM uses 5 as well).
INITIAL_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    """The part of the Tokenizer protocol detokenization needs."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Text of one request's output tokens, produced token by token.

    The concatenation of every `add_token` delta and the final `flush` equals
    ``output_text``; for tokenizers whose decode is context-free (byte-level BPE) it also
    equals ``decode(output ids)``.
    """

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Only the context window of the prompt is kept: output text never needs more.
        context = list(prompt_token_ids[-INITIAL_CONTEXT_TOKENS:])
        # A prompt ending inside a UTF-8 character would lend its bytes to the output's
        # first character; decode the output on its own instead (output == decode(output)).
        if tokenizer.decode(context, skip_special_tokens=skip_special_tokens).endswith(
            _REPLACEMENT_CHAR
        ):
            context = []
        self._token_ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._num_output_tokens = 0
        self.output_text = ""
        """All text emitted so far (deltas concatenated)."""

    @property
    def num_output_tokens(self) -> int:
        return self._num_output_tokens

    def add_token(self, token_id: int) -> str:
        """Appends one output token; returns the text it completes ('' while held back)."""
        self._token_ids.append(token_id)
        self._num_output_tokens += 1
        prefix_text, new_text = self._decode_window()
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(prefix_text) :]
        self._advance()
        self.output_text += delta
        return delta

    def flush(self) -> str:
        """Emits whatever is still held back (call once, when the request finishes)."""
        prefix_text, new_text = self._decode_window()
        delta = new_text[len(prefix_text) :]
        self._advance()
        self.output_text += delta
        return delta

    def _decode_window(self) -> tuple[str, str]:
        ids = self._token_ids
        skip = self._skip_special_tokens
        prefix_text = self._tokenizer.decode(
            ids[self._prefix_offset : self._read_offset], skip_special_tokens=skip
        )
        new_text = self._tokenizer.decode(ids[self._prefix_offset :], skip_special_tokens=skip)
        return prefix_text, new_text

    def _advance(self) -> None:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        # Drop ids before the window so memory stays O(window), not O(output length).
        if self._prefix_offset:
            del self._token_ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
