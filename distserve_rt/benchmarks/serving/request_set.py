"""Benchmark requests: a workload's lengths turned into prompt token ids, forced output
lengths and arrival offsets.

No text is needed: prompts are random token ids of the requested length drawn from the
tokenizer's vocabulary without its special ids (the OpenAI completions API accepts a list of
ids as ``prompt``), and every output is forced to its length (``ignore_eos``, ``max_tokens =
min_tokens = output_len``). Lengths and token ids depend only on the seed, never on the rate:
every rate of a sweep replays the same requests, with arrival gaps that are the same unit
gaps scaled by ``1 / rate`` (common random numbers, as the planner's search does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from distserve_rt.workloads.arrivals import unit_interarrivals
from distserve_rt.workloads.workload import Workload


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request to send: prompt ids, forced output length and when to send it."""

    request_id: str
    prompt_token_ids: list[int]
    output_len: int
    """Tokens to generate (forced: ignore_eos, max_tokens = min_tokens = output_len)."""
    arrival_s: float
    """Offset from the start of the run, seconds (0 for every request at rate inf)."""

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class RequestSet:
    """The requests of one run and how many had their lengths clipped to ``max_model_len``."""

    requests: list[BenchRequest]
    num_clipped: int
    rate: float
    """Requests per second (``math.inf``: all at once)."""
    burstiness: float


def clip_lengths(
    prompt_lens: np.ndarray, output_lens: np.ndarray, max_model_len: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Fit every request into ``max_model_len`` tokens (prompt + output).

    The output is kept whole when it fits (it decides TPOT, which the benchmark forces) and
    capped at ``max_model_len - 1`` otherwise; the prompt is cut to what is left. Returns
    the clipped int64 arrays ``[num_requests]`` and the number of requests changed.
    """
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be >= 2 tokens, got {max_model_len!r}")
    prompt = np.asarray(prompt_lens, dtype=np.int64)
    output = np.minimum(np.asarray(output_lens, dtype=np.int64), max_model_len - 1)
    prompt = np.minimum(prompt, max_model_len - output)
    changed = (prompt != prompt_lens) | (output != output_lens)
    return prompt, output, int(changed.sum())


def text_token_ids(vocab_size: int, special_ids: list[int]) -> np.ndarray:
    """Ids of ``[0, vocab_size)`` that are not special (int64, sorted)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size!r}")
    allowed = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), np.asarray(special_ids))
    if allowed.size == 0:
        raise ValueError(f"every id of the vocabulary ({vocab_size}) is special")
    return allowed


def tokenizer_special_ids(tokenizer: Any) -> list[int]:
    """``tokenizer.all_special_ids`` (ours and HF's have it), else bos/eos/pad ids."""
    ids = getattr(tokenizer, "all_special_ids", None)
    if ids is not None:
        return [int(i) for i in ids]
    names = ("bos_token_id", "eos_token_id", "pad_token_id")
    return [int(v) for v in (getattr(tokenizer, n, None) for n in names) if v is not None]


def prompt_text(ids: list[int], tokenizer: Any, max_rounds: int = 8) -> str:
    """Text for a chat message that the tokenizer reads back as at most ``len(ids)`` tokens.

    Decoding random ids and encoding the text again rarely gives the same ids (merges
    differ, a lone byte becomes U+FFFD, 3 bytes): the chat client sends text, so without
    this a 64-token random prompt arrives as ~110 tokens. Cut and re-decode until it fits,
    as vllm bench serve's random dataset corrects its prompts."""
    n = len(ids)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    again = tokenizer.encode(text, add_special_tokens=False)
    cut = n
    for _ in range(max_rounds):
        if len(again) <= n:
            return text
        text = tokenizer.decode(again[:cut], skip_special_tokens=True)
        again = tokenizer.encode(text, add_special_tokens=False)
        # A cut may split a character whose bytes come back as a longer U+FFFD: the next
        # cut is shorter by what this one overshot.
        cut = max(0, cut - max(1, len(again) - n))
    if len(again) > n:
        raise ValueError(f"cannot fit a {n}-token prompt as text for this tokenizer")
    return text


def arrival_offsets(
    num_requests: int, rate: float, *, burstiness: float = 1.0, seed: int = 0
) -> np.ndarray:
    """Send times (s from the start, float64 ``[num_requests]``, first at 0).

    Poisson at ``rate`` req/s for ``burstiness == 1``, else gamma gaps with shape
    ``burstiness`` (vLLM's ``--burstiness``: < 1 is burstier, > 1 more even; the gaps' CV is
    ``1 / sqrt(burstiness)``). ``rate == inf`` sends everything at once.
    """
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness!r}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s (or inf), got {rate!r}")
    if math.isinf(rate):
        return np.zeros(num_requests)
    gaps = unit_interarrivals(num_requests, cv=burstiness**-0.5, seed=seed)
    # The first request goes out at once (as vllm bench serve does); the rest keep the gaps.
    gaps[0] = 0.0
    return np.cumsum(gaps) / rate


def build_requests(
    workload: Workload,
    *,
    rate: float,
    vocab_size: int,
    special_ids: list[int],
    max_model_len: int,
    burstiness: float = 1.0,
    seed: int = 0,
    id_prefix: str = "bench-",
    prompts: list[list[int]] | None = None,
) -> RequestSet:
    """All of ``workload``'s requests, clipped to ``max_model_len``, sent at ``rate``.

    ``prompts``: each row's own prompt ids (a ShareGPT file's), cut to the clipped prompt
    length; without them prompts are random ids (the same for every rate)."""
    if prompts is not None and len(prompts) != workload.num_requests:
        raise ValueError(
            f"prompts has {len(prompts)} rows for a workload of {workload.num_requests}"
        )
    prompt, output, num_clipped = clip_lengths(
        workload.prompt_lens, workload.output_lens, max_model_len
    )
    allowed = text_token_ids(vocab_size, special_ids)
    rng = np.random.default_rng(seed)
    arrivals = arrival_offsets(workload.num_requests, rate, burstiness=burstiness, seed=seed)
    requests = [
        BenchRequest(
            request_id=f"{id_prefix}{i}",
            prompt_token_ids=(
                rng.choice(allowed, int(p)).tolist() if prompts is None else prompts[i][: int(p)]
            ),
            output_len=int(o),
            arrival_s=float(t),
        )
        for i, (p, o, t) in enumerate(zip(prompt, output, arrivals, strict=True))
    ]
    return RequestSet(requests, num_clipped, rate, burstiness)
