"""The two seams of the engine layer.

- `EngineCore`: the synchronous engine one thread drives (add / abort / step ...). The
  colocated `LLMEngine` and the disaggregated `Controller` implement it directly; `LLM`
  (offline) and `AsyncLLM` (serving) drive any of them, built by `engine.core.make_engine_core`.
- `EngineClient`: what the HTTP server and the serving benchmark need from an engine.
  `AsyncLLM` implements it for every placement, so `drt-run serve` and `drt-run bench`
  never depend on how the engine is laid out. Tests implement it with a fake.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from distserve_rt.outputs import RequestOutput
from distserve_rt.sampling_params import SamplingParams

PromptType = str | dict[str, Any]
"""Text, or ``{"prompt_token_ids": [...]}`` (vLLM's TokensPrompt)."""


class EngineOverloadedError(RuntimeError):
    """Admission refused: the engine's queues are full. The server answers 503."""


class EngineDeadError(RuntimeError):
    """The engine (or every instance of one phase) is gone; nothing more will be served."""


@dataclass(slots=True)
class InstanceStats:
    """A point-in-time view of one instance, for /metrics and the periodic stats log."""

    name: str
    """e.g. "prefill-0", "decode-1", "colocated-0"."""
    role: str
    """"prefill", "decode" or "colocated"."""
    num_running: int
    num_waiting: int
    kv_usage: float
    """Fraction of the instance's KV blocks in use, 0..1."""
    alive: bool = True
    prefix_cache_queries: int = 0
    """Prompt tokens looked up in the prefix cache since start (0 with caching off)."""
    prefix_cache_hits: int = 0
    """Of those, tokens found cached: their prefill was skipped."""
    num_prefills: int = 0
    """Disaggregated: prefills the instance ran since start (a decode instance's are local
    ones, conditional disaggregation); 0 for colocated instances."""
    num_blocks_pulled: int = 0
    """Decode instances: KV blocks their migrations copied from prefill instances."""
    num_blocks_reused: int = 0
    """Decode instances: migrated blocks found in their own prefix cache (not copied)."""


@dataclass(slots=True)
class TransferTotals:
    """KV transfers since start (all zero for colocated placements): the engine's, and each
    decode instance's `Puller.totals`. One transfer is one migration (all its slices)."""

    transport: str = "none"
    num_transfers: int = 0
    """Migrations whose KV arrived."""
    num_failures: int = 0
    bytes: int = 0
    """Bytes moved by the migrations that arrived."""
    seconds: float = 0.0
    """Sum over the migrations that arrived of their slowest transfer's seconds (pulls
    overlap, so this exceeds wall time under load)."""


@dataclass(slots=True)
class EngineStats:
    instances: list[InstanceStats] = field(default_factory=list)
    transfers: TransferTotals = field(default_factory=TransferTotals)


@runtime_checkable
class EngineCore(Protocol):
    """A synchronous engine: not thread-safe, one thread calls everything but `stats`."""

    model_config: Any
    """`ModelConfig` of the loaded model."""
    scheduler_config: Any
    """`SchedulerConfig` (its ``max_model_len`` is the context limit requests are held to)."""
    tokenizer: Any
    """Given at construction (None: token ids only, no text, stop strings refused)."""

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams | None = None,
        *,
        prompt: str | None = None,
        arrival_time: float | None = None,
        stream: bool = False,
    ) -> object:
        """Queues a request. ValueError for invalid input (nothing is queued then);
        `EngineDeadError` when the engine cannot take it."""

    def abort_request(self, request_id: str) -> bool:
        """Ends a live request with finish_reason "abort" (reported by a later `step`);
        False when the id is unknown or finished."""

    def step(self, timeout_s: float = 0.0) -> list[RequestOutput]:
        """Makes progress (a batch, or the instances' messages, waiting up to `timeout_s`
        for them); returns finished requests' outputs and streaming ones' new tokens."""

    def has_unfinished_requests(self) -> bool: ...

    def stats(self) -> EngineStats:
        """A snapshot safe to read from another thread (the /metrics scrape)."""

    def check_health(self) -> None:
        """Raises `EngineDeadError` when the engine cannot serve."""

    def shutdown(self) -> None:
        """Stops the engine (and its processes); idempotent."""


@runtime_checkable
class EngineClient(Protocol):
    model_name: str
    """The name clients use in the OpenAI ``model`` field."""
    max_model_len: int

    @property
    def tokenizer(self) -> Any:
        """`distserve_rt.tokenizer.Tokenizer` (encode/decode/apply_chat_template)."""

    def generate(
        self, prompt: PromptType, sampling_params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Submits a request and yields its cumulative `RequestOutput` whenever it has new
        tokens (the first one as soon as the first token exists); the last has
        ``finished=True`` (finish_reason "error" with ``error`` set when it failed).

        Raises ValueError for invalid input (the server answers 400) and
        `EngineOverloadedError` when admission is refused (503). Closing the iterator
        early (client disconnect) aborts the request.
        """

    async def abort(self, request_id: str) -> None:
        """Stops the request wherever it is and frees its KV; unknown ids are ignored."""

    def stats(self) -> EngineStats:
        """Queue lengths, KV usage and transfer totals, cheap enough for every scrape."""

    async def check_health(self) -> None:
        """Raises `EngineDeadError` when the engine cannot serve."""
