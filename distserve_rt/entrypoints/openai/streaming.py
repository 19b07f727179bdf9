"""Server-sent events and the per-chunk delta of cumulative engine outputs."""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from distserve_rt.entrypoints.openai.errors import OpenAIError
from distserve_rt.logger import init_logger
from distserve_rt.logprobs import Logprob
from distserve_rt.outputs import CompletionOutput

logger = init_logger(__name__)

DONE_EVENT = "data: [DONE]\n\n"


def sse(body: BaseModel) -> str:
    return f"data: {body.model_dump_json()}\n\n"


@dataclass
class OutputDelta:
    """What a cumulative `CompletionOutput` adds since the previous one."""

    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    text_offset: int
    """Characters of generated text before this delta."""


@dataclass
class DeltaTracker:
    num_chars: int = 0
    num_tokens: int = 0

    def next(self, completion: CompletionOutput) -> OutputDelta:
        delta = OutputDelta(
            text=completion.text[self.num_chars :],
            token_ids=list(completion.token_ids[self.num_tokens :]),
            logprobs=(
                None if completion.logprobs is None else completion.logprobs[self.num_tokens :]
            ),
            text_offset=self.num_chars,
        )
        self.num_chars = len(completion.text)
        self.num_tokens = len(completion.token_ids)
        return delta


class SSEResponse(StreamingResponse):
    """A `StreamingResponse` of SSE that always closes its body iterator.

    Starlette cancels the iterator on client disconnect only for ASGI spec < 2.4; under
    2.4 it stops iterating and leaves the generator suspended, so its ``finally`` (which
    aborts the engine request) would wait for garbage collection. Closing it here makes the
    abort immediate under both.
    """

    def __init__(self, content: Any) -> None:
        super().__init__(content, media_type="text/event-stream")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def internal_error(exc: Exception, request_id: str) -> OpenAIError:
    """An unexpected error while writing a response, logged with its traceback."""
    logger.exception("request %s: error while writing the response", request_id)
    return OpenAIError(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}")


@dataclass
class ChoiceDelta:
    """One completion's news in a chunk: its delta, and its finish reason when it ended."""

    completion: CompletionOutput
    delta: OutputDelta
    finished: bool


class ChoiceTracker:
    """Deltas of the n completions of cumulative outputs (n > 1: each by its index).

    A completion appears in a chunk when it has new tokens or text, and once more when it
    finishes (its finish reason, reported once); ``num_tokens`` counts every completion's
    tokens so far (usage)."""

    def __init__(self) -> None:
        self._trackers: dict[int, DeltaTracker] = {}
        self._done: set[int] = set()

    @property
    def num_tokens(self) -> int:
        return sum(t.num_tokens for t in self._trackers.values())

    def next(self, output) -> list[ChoiceDelta]:
        """The news of `output` (a `RequestOutput`), in completion index order."""
        news = []
        for completion in output.outputs:
            tracker = self._trackers.setdefault(completion.index, DeltaTracker())
            delta = tracker.next(completion)
            # A completion's reason is final once set (best_of > n never streams, so
            # indices never move); the request's end closes every completion.
            finished = output.finished or completion.finish_reason is not None
            newly_done = finished and completion.index not in self._done
            if newly_done:
                self._done.add(completion.index)
            if delta.token_ids or delta.text or newly_done:
                news.append(ChoiceDelta(completion, delta, newly_done))
        return news
