"""A request's state through the engine, and its lifecycle timestamps.

Token accounting (the same for prefill, chunked prefill, decode and recompute)::

    token_ids            = prompt tokens + generated tokens          (num_tokens)
    num_computed_tokens  = leading tokens whose KV is in the cache (or scheduled this step)

A step computes ``token_ids[num_computed_tokens : num_computed_tokens + n]``. A decode has
``n == 1`` (the last generated token); a prefill has the rest of the prompt, or a chunk of
it. Preemption by recompute drops the KV (``num_computed_tokens = 0``) and keeps the
generated tokens, so the next prefill covers prompt + generated tokens and samples the next
token from the last row, as if they had all been the prompt.

Every timestamp is ``time.monotonic()`` seconds, passed in by the engine (the schedulers never
read a clock, so a simulator can drive them with simulated time).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from distserve_rt.core.stop_checker import FinishReason, StopChecker
from distserve_rt.logprobs import Logprob
from distserve_rt.sampling_params import SamplingParams

if TYPE_CHECKING:  # a simulator builds requests without loading torch
    import torch


class RequestStatus(enum.IntEnum):
    WAITING = 0
    """Queued for its first prefill."""
    RUNNING = 1
    """Holds KV blocks: being prefilled (maybe in chunks) or decoded."""
    PREEMPTED = 2
    """Its KV was dropped to make room; queued again to recompute it."""
    FINISHED_STOPPED = 3
    """EOS, a stop token id or a stop string."""
    FINISHED_LENGTH = 4
    """max_tokens or the model's context length reached."""
    FINISHED_ABORTED = 5
    """Aborted by the caller."""
    FINISHED_ERROR = 6
    """Could not be served (e.g. never fits the KV pool); `error` says why."""

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> FinishReason | None:
        """Why a finished request ended (None while it runs)."""
        return _REASON_OF.get(self)

    @staticmethod
    def finished(reason: FinishReason) -> RequestStatus:
        """The FINISHED_* status of `reason`."""
        return _STATUS_OF[reason]


_REASON_OF = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}
_STATUS_OF = {reason: status for status, reason in _REASON_OF.items()}


def mean_tpot(token_times: list[float]) -> float | None:
    """Mean time per output token after the first; None with fewer than two tokens (the
    one definition: colocated requests, the controller's requests and the benchmarks)."""
    if len(token_times) < 2:
        return None
    return (token_times[-1] - token_times[0]) / (len(token_times) - 1)


class RequestEventType(enum.Enum):
    ARRIVED = "arrived"
    SCHEDULED = "scheduled"
    """First time any of its tokens was scheduled (queueing ends)."""
    PREEMPTED = "preempted"
    FIRST_TOKEN = "first_token"
    TOKEN = "token"
    """Every generated token, the first included."""
    FINISHED = "finished"


class Request:
    """One generation request. Slots-based: the scheduler touches hundreds of them per step.

    Args:
        request_id: the caller's id (unique among live requests).
        seq_id: the engine's integer id, the block manager's key.
        prompt_token_ids: the prompt, non-empty.
        sampling_params: how to sample and when to stop.
        arrival_time: ``time.monotonic()`` when the request arrived.
        max_model_len: context length; generation stops at it (FINISHED_LENGTH).
        prompt: the prompt text, when it came as text (for the output only).
    """

    __slots__ = (
        "request_id",
        "seq_id",
        "prompt",
        "token_ids",
        "num_prompt_tokens",
        "sampling_params",
        "max_num_tokens",
        "status",
        "num_computed_tokens",
        "num_preemptions",
        "generator",
        "generator_state",
        "stop_checker",
        "logprobs",
        "error",
        "stop_reason",
        "output_text",
        "arrival_time",
        "first_scheduled_time",
        "first_token_time",
        "finished_time",
        "token_times",
        "preempted_times",
        "forks",
        "seq_index",
    )

    def __init__(
        self,
        request_id: str,
        seq_id: int,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        arrival_time: float,
        max_model_len: int,
        prompt: str | None = None,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r}: prompt_token_ids must not be empty")
        self.request_id = request_id
        self.seq_id = seq_id
        self.prompt = prompt
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling_params = sampling_params
        max_tokens = sampling_params.max_tokens
        limit = max_model_len if max_tokens is None else self.num_prompt_tokens + max_tokens
        self.max_num_tokens = min(limit, max_model_len)
        """Total tokens (prompt + generated) at which generation stops with LENGTH."""
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_preemptions = 0
        self.generator: torch.Generator | None = None
        """The request's own random stream (seeded requests), made by the sampler on the
        logits' device at its first token and kept across steps and preemptions."""
        self.generator_state: bytes | None = None
        """A migrated seeded request's stream (`layers.generator_state` bytes from the
        prefill instance): the sampler restores `generator` from it, instead of seeding
        one, at the request's first sampled token here (then it is cleared)."""
        self.stop_checker: StopChecker | None = None
        """Owned by the engine: stop rules and the text to stream."""
        self.logprobs: list[dict[int, Logprob]] | None = None
        self.error: str | None = None
        self.stop_reason: int | str | None = None
        """The stop token id or stop string that ended the request (None for EOS/length)."""
        self.output_text = ""
        self.arrival_time = arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None
        self.token_times: list[float] = []
        self.preempted_times: list[float] = []
        self.forks: list[Request] = []
        """Parallel sampling (n > 1, best_of): the group's other sequences, not yet in any
        queue. The scheduler forks them off this request's blocks (`BlockManager.fork`)
        when it schedules the prefill chunk that completes the prompt: they sample their
        first token from the same logits row, then decode on their own (empty after)."""
        self.seq_index = 0
        """This sequence's index in its request's group (0 for the request itself)."""

    # ---- tokens -----------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose KV a step still has to compute (1 for a decode)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def num_seqs(self) -> int:
        """Sequences this request will run as (itself and its pending forks)."""
        return 1 + len(self.forks)

    @property
    def is_finished(self) -> bool:
        return self.status >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.status.finish_reason

    # ---- lifecycle (the engine and the schedulers call these with the step's time) -----

    def mark_scheduled(self, now: float) -> None:
        if self.first_scheduled_time is None:
            self.first_scheduled_time = now

    def mark_preempted(self, now: float) -> None:
        """Drops the KV bookkeeping; generated tokens stay (they are recomputed)."""
        self.status = RequestStatus.PREEMPTED
        self.num_computed_tokens = 0
        self.num_preemptions += 1
        self.preempted_times.append(now)

    def append_token(self, token_id: int, now: float) -> None:
        self.token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_times.append(now)

    def finish(self, status: RequestStatus, now: float, error: str | None = None) -> None:
        if not status.is_finished:
            raise ValueError(f"finish status must be a FINISHED_* status, got {status!r}")
        self.status = status
        self.finished_time = now
        if error is not None:
            self.error = error

    def events(self) -> list[tuple[RequestEventType, float]]:
        """The lifecycle as (event, time) pairs in time order (built on demand)."""
        events = [(RequestEventType.ARRIVED, self.arrival_time)]
        if self.first_scheduled_time is not None:
            events.append((RequestEventType.SCHEDULED, self.first_scheduled_time))
        events += [(RequestEventType.PREEMPTED, t) for t in self.preempted_times]
        if self.first_token_time is not None:
            events.append((RequestEventType.FIRST_TOKEN, self.first_token_time))
        events += [(RequestEventType.TOKEN, t) for t in self.token_times]
        if self.finished_time is not None:
            events.append((RequestEventType.FINISHED, self.finished_time))
        # Stable sort: at equal times the order above (first token before its TOKEN) holds.
        events.sort(key=lambda e: e[1])
        return events

    # ---- derived metrics (seconds; None until the events exist) ------------------------

    @property
    def queue_time(self) -> float | None:
        t = self.first_scheduled_time
        return None if t is None else t - self.arrival_time

    @property
    def ttft(self) -> float | None:
        t = self.first_token_time
        return None if t is None else t - self.arrival_time

    @property
    def tpot(self) -> float | None:
        return mean_tpot(self.token_times)

    @property
    def itl(self) -> list[float]:
        """Inter-token latencies: the gaps between consecutive tokens."""
        times = self.token_times
        return [b - a for a, b in zip(times, times[1:], strict=False)]

    @property
    def e2e_latency(self) -> float | None:
        t = self.finished_time
        return None if t is None else t - self.arrival_time

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, seq_id={self.seq_id}, status={self.status.name}, "
            f"num_tokens={self.num_tokens}, num_computed_tokens={self.num_computed_tokens})"
        )
