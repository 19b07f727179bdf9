"""Per-request sampling parameters, shaped like vLLM's `SamplingParams`.

Validated on construction: a bad value raises ValueError naming the field, the value and
what is allowed, so the Python API, the CLI and the HTTP server all report the same thing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Below this, temperature sampling is numerically greedy; vLLM uses the same cut-off.
_GREEDY_EPS = 1e-5


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens and when to stop, for one request."""

    n: int = 1
    """Completions returned per prompt. The prompt is prefilled once and its KV blocks are
    shared by the sequences (copy-on-write); with a seed, sequence i samples with seed + i
    (so sequence 0 is the n == 1 output), and greedy sequences are n identical copies."""
    temperature: float = 1.0
    """0 means greedy; otherwise logits are divided by it before softmax (at most the
    largest float32, `MAX_TEMPERATURE`)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 (or 0) keeps all."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely one's."""
    seed: int | None = None
    """Per-request seed: the same seed and prompt give the same tokens in any batch."""
    max_tokens: int | None = 16
    """Tokens to generate at most; None means up to the model's context length."""
    min_tokens: int = 0
    """EOS and stop token ids are suppressed until this many tokens are generated."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: generation ends when the text contains one (not included in output)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end generation besides EOS (included in token_ids, not in text)."""
    ignore_eos: bool = False
    """Keep generating after EOS (benchmarks force output lengths with it)."""
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    """Return the log-probability of the sampled token and of this many top tokens."""
    skip_special_tokens: bool = True
    best_of: int | None = None
    """Sequences generated per prompt (>= n; None means n): the n with the highest
    cumulative logprob are returned. Not with streaming when > n (vLLM's rule)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check_int("n", self.n, 1)
        if self.best_of is not None:
            _check_int("best_of", self.best_of, 1)
            if self.best_of < self.n:
                raise ValueError(f"best_of must be >= n ({self.n}), got {self.best_of!r}")
        # The sampler divides float32 logits by it: a larger value becomes inf there, and
        # -inf / inf (a min_tokens-suppressed token) is NaN, sampling an id past the vocab.
        _check_float("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        _check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_int("top_k", self.top_k, -1)
        _check_float("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            # torch.Generator takes 64-bit seeds; a larger one would pass here and then fail
            # the engine step, and with it every request batched beside it.
            _check_int("seed", self.seed, 0)
            if self.seed > MAX_SEED:
                raise ValueError(f"seed must be in [0, 2**64 - 1], got {self.seed!r}")
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1)
        _check_int("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
            )
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids[]", t, 0)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def num_sequences(self) -> int:
        """Sequences the engine generates for the prompt: best_of, else n."""
        return self.n if self.best_of is None else self.best_of


MAX_SEED = 2**64 - 1
"""torch.Generator.manual_seed takes any unsigned 64-bit seed (the whole range is tested
end to end, the top half included)."""
MAX_TEMPERATURE = 3.4028234663852886e38
"""The largest float32 (the sampler's dtype)."""


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_float(
    name: str, value: object, low: float, high: float, *, low_open: bool = False
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        # Infinity is never allowed: temperature=inf would turn masked -inf logits into NaN.
        left = "(" if low_open else "["
        right = ")" if high == math.inf else "]"
        allowed = f"{left}{low}, {high}{right}"
        raise ValueError(f"{name} must be a finite number in {allowed}, got {value!r}")
