"""When a request stops, why, and the text that may be streamed after each token.

One `StopChecker` per request, fed every generated token in order. It owns the request's
`IncrementalDetokenizer` (None when the engine runs on token ids only, e.g. benchmarks),
so it can cut the text at a stop string and hold back text a stream must not show yet.

Rules (vLLM's):
  * nothing but the length limits stops a request before ``min_tokens`` output tokens;
  * EOS (unless ``ignore_eos``) and ``stop_token_ids`` stop with STOP; the token stays in
    the token ids but its text is left out unless ``include_stop_str_in_output``;
  * a stop string stops with STOP; the text is cut before it (after it with
    ``include_stop_str_in_output``). Only the new text plus the last ``len(stop) - 1``
    characters before it are searched, so the cost per token does not grow with length;
    when several stop strings complete, the earliest occurrence wins;
  * ``max_tokens`` output tokens, or the model's ``max_model_len`` tokens in all, stop with
    LENGTH (checked after the STOP rules: a token that does both reports STOP).

Streaming hold-back: while running, the longest suffix of the text that is the beginning
of some stop string is not streamed yet, so a stream never shows text that a later token
turns into a stop string and cuts. With ``include_stop_str_in_output`` nothing is cut
before the stop string's end, so nothing is held back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from distserve_rt.core.detokenizer import IncrementalDetokenizer
from distserve_rt.sampling_params import SamplingParams


class FinishReason(enum.StrEnum):
    """Why a request ended: the one vocabulary of the engines, the instance messages and the
    outputs. A `str` whose value is the OpenAI API's ``finish_reason`` (``== "stop"`` holds,
    JSON writes "stop")."""

    STOP = "stop"
    """EOS, a stop token id or a stop string."""
    LENGTH = "length"
    """max_tokens, or the model's context length."""
    ABORT = "abort"
    """Cancelled by the client or the engine (set by the engine, never by StopChecker)."""
    ERROR = "error"
    """Failed, e.g. a KV transfer timed out (set by the engine)."""


@dataclass(slots=True)
class StopCheckResult:
    """Outcome of one token."""

    text_delta: str
    """Text to stream now ('' if none); all deltas concatenated == the final output text."""
    finish_reason: FinishReason | None
    """None while the request keeps running."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended it; None for EOS, LENGTH or running."""


# What a token-only request that keeps running gets back (shared: do not mutate).
_CONTINUE = StopCheckResult(text_delta="", finish_reason=None)


class StopChecker:
    """Per-request stop logic; see the module docstring for the rules."""

    def __init__(
        self,
        params: SamplingParams,
        *,
        eos_token_id: int | None,
        num_prompt_tokens: int,
        max_model_len: int,
        detokenizer: IncrementalDetokenizer | None,
        num_output_tokens: int = 0,
        apply_stop_strings: bool = True,
    ) -> None:
        """`num_output_tokens`: tokens generated before (a migrated or retried request: they
        count toward min_tokens and max_tokens). `apply_stop_strings=False`: the token rules
        only, for a prefill or decode instance, which has no text: the controller applies
        the stop strings to the streamed text and aborts the request on its instance."""
        if params.stop and detokenizer is None and apply_stop_strings:
            raise ValueError(f"stop={params.stop!r} needs a detokenizer (none was given)")
        if num_prompt_tokens >= max_model_len:
            raise ValueError(
                f"num_prompt_tokens ({num_prompt_tokens}) must be < max_model_len "
                f"({max_model_len}) to leave room for output"
            )
        self._params = params
        self._eos_token_id = eos_token_id
        self._num_prompt_tokens = num_prompt_tokens
        self._max_model_len = max_model_len
        self._detokenizer = detokenizer
        self._stop_ids = frozenset(params.stop_token_ids)
        stops = params.stop if apply_stop_strings else []
        self._max_stop_len = max((len(s) for s in stops), default=0)
        self._text = ""
        self._num_streamed_chars = 0
        self.num_output_tokens = num_output_tokens
        self.finish_reason: FinishReason | None = None
        # Fast path of `append` (token ids only, no stop token, below the length limits):
        # the engine calls append for every running request every step (256 per step).
        self._fast_path = detokenizer is None
        eos = {eos_token_id} if eos_token_id is not None and not params.ignore_eos else set()
        self._stop_or_eos_ids = self._stop_ids | eos
        max_by_context = max_model_len - num_prompt_tokens
        max_tokens = params.max_tokens
        self._max_num_output_tokens = (
            max_by_context if max_tokens is None else min(max_tokens, max_by_context)
        )

    @property
    def output_text(self) -> str:
        """The text so far (final once finished), including what is not streamed yet."""
        return self._text

    def append(self, token_id: int) -> StopCheckResult:
        """Takes the next output token; returns the text to stream and whether it stops."""
        if self.finish_reason is not None:
            raise RuntimeError(f"append after the request finished ({self.finish_reason})")
        if (
            self._fast_path
            and token_id not in self._stop_or_eos_ids
            and self.num_output_tokens + 1 < self._max_num_output_tokens
        ):
            # Without a detokenizer there is no text and no stop string: nothing can stop.
            self.num_output_tokens += 1
            return _CONTINUE
        self.num_output_tokens += 1
        may_stop = self.num_output_tokens >= self._params.min_tokens
        stop_token = may_stop and self._is_stop_token(token_id)
        if stop_token and not self._params.include_stop_str_in_output:
            new_text = ""  # the stop token's own text is not output
        else:
            new_text = self._detokenize(token_id)
        if stop_token:
            reason = None if token_id == self._eos_token_id else token_id
            return self._finish(FinishReason.STOP, reason, new_text + self._flush())
        self._text += new_text
        if may_stop and new_text and self._max_stop_len:
            stop = self._find_stop_string(len(new_text))
            if stop is not None:
                return self._finish(FinishReason.STOP, stop, "")
        if self._hit_length_limit():
            return self._finish(FinishReason.LENGTH, None, self._flush())
        return StopCheckResult(text_delta=self._stream_delta(), finish_reason=None)

    def _is_stop_token(self, token_id: int) -> bool:
        if token_id in self._stop_ids:
            return True
        return token_id == self._eos_token_id and not self._params.ignore_eos

    def _hit_length_limit(self) -> bool:
        max_tokens = self._params.max_tokens
        if max_tokens is not None and self.num_output_tokens >= max_tokens:
            return True
        return self._num_prompt_tokens + self.num_output_tokens >= self._max_model_len

    def _detokenize(self, token_id: int) -> str:
        return "" if self._detokenizer is None else self._detokenizer.add_token(token_id)

    def _flush(self) -> str:
        return "" if self._detokenizer is None else self._detokenizer.flush()

    def _find_stop_string(self, num_new_chars: int) -> str | None:
        """Cuts ``_text`` at the earliest stop string that ends in the new text."""
        found: tuple[int, int, str] | None = None  # (start, -len, stop): earliest, longest
        for stop in self._params.stop:
            start = self._text.find(stop, max(0, len(self._text) - num_new_chars - len(stop) + 1))
            if start >= 0 and (found is None or (start, -len(stop)) < found[:2]):
                found = (start, -len(stop), stop)
        if found is None:
            return None
        start, _, stop = found
        end = start + len(stop) if self._params.include_stop_str_in_output else start
        self._text = self._text[:end]
        return stop

    def _finish(
        self, reason: FinishReason, stop_reason: int | str | None, tail: str
    ) -> StopCheckResult:
        self._text += tail
        self.finish_reason = reason
        delta = self._text[self._num_streamed_chars :]
        self._num_streamed_chars = len(self._text)
        return StopCheckResult(text_delta=delta, finish_reason=reason, stop_reason=stop_reason)

    def _stream_delta(self) -> str:
        end = len(self._text) - self._held_back_chars()
        if end <= self._num_streamed_chars:
            return ""
        delta = self._text[self._num_streamed_chars : end]
        self._num_streamed_chars = end
        return delta

    def _held_back_chars(self) -> int:
        """Length of the longest suffix of the text that begins some stop string."""
        if not self._max_stop_len or self._params.include_stop_str_in_output:
            return 0
        tail = self._text[-(self._max_stop_len - 1) :] if self._max_stop_len > 1 else ""
        for num_chars in range(len(tail), 0, -1):
            suffix = tail[-num_chars:]
            if any(stop.startswith(suffix) for stop in self._params.stop):
                return num_chars
        return 0
