"""`AsyncLLM`: the streaming, async engine client (`EngineClient`) for every placement.

    async with AsyncLLM.from_config(EngineConfig(), Placement.disaggregated()) as llm:
        async for output in llm.generate("Hello", SamplingParams(max_tokens=8), "r0"):
            print(output.outputs[0].text)

The engine (an `LLMEngine` for colocated placements, the `Controller` of the prefill and
decode instances otherwise) runs in one background thread, which alone touches it: callers
enqueue commands (add, abort) and receive cumulative `RequestOutput`s on per-request asyncio
queues. Torch and the instances release the GIL while they compute, so the event loop stays
responsive.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any

from distserve_rt.config import DisaggConfig, EngineConfig, Placement
from distserve_rt.engine.core import make_engine_core
from distserve_rt.engine.protocol import (
    EngineCore,
    EngineDeadError,
    EngineOverloadedError,
    EngineStats,
    PromptType,
)
from distserve_rt.logger import init_logger
from distserve_rt.outputs import RequestOutput
from distserve_rt.sampling_params import SamplingParams

logger = init_logger(__name__)

_IDLE_WAIT_S = 0.05
"""How long the engine thread sleeps on its command queue when nothing runs."""
_BUSY_WAIT_S = 0.002
"""How long a disaggregated step waits for instance messages while requests run."""


class AsyncLLM:
    """An `EngineClient` over a colocated engine or a disaggregated controller.

    Args:
        core: any `EngineCore` (`LLMEngine`, `Controller`), with its tokenizer.
        model_name: the name clients use in the OpenAI ``model`` field.
        max_num_pending: live requests at most; `generate` raises EngineOverloadedError
            beyond it (None: unlimited).
    """

    def __init__(
        self, core: EngineCore, model_name: str, max_num_pending: int | None = None
    ) -> None:
        if max_num_pending is not None and max_num_pending < 1:
            raise ValueError(f"max_num_pending must be >= 1 or None, got {max_num_pending!r}")
        self._core = core
        self.model_name = model_name
        self.max_model_len: int = core.scheduler_config.max_model_len
        self._max_num_pending = max_num_pending
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._dead: str | None = None
        self._stopping = threading.Event()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="drt-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(
        cls,
        config: EngineConfig,
        placement: Placement | str | None = None,
        disagg_config: DisaggConfig | None = None,
        model_name: str | None = None,
        max_num_pending: int | None = None,
    ) -> AsyncLLM:
        """Builds the engine of `placement` (colocated by default) and its tokenizer."""
        core = make_engine_core(config, placement, disagg_config)
        return cls(core, model_name or config.model, max_num_pending)

    # ---- EngineClient --------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self._core.tokenizer

    @property
    def model_config(self) -> Any:
        """The loaded model's `ModelConfig` (the server's start-up log shows it)."""
        return self._core.model_config

    async def generate(
        self, prompt: PromptType, sampling_params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Yields the request's cumulative outputs (see `EngineClient.generate`)."""
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if self._max_num_pending is not None and len(self._streams) >= self._max_num_pending:
            raise EngineOverloadedError(
                f"{len(self._streams)} requests are live (max_num_pending="
                f"{self._max_num_pending}); retry later"
            )
        token_ids, text = self._tokenize(prompt)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._commands.put(("add", request_id, token_ids, sampling_params, text))
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))  # the client went away

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def stats(self) -> EngineStats:
        return self._core.stats()

    async def check_health(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        self._core.check_health()

    def shutdown(self) -> None:
        """Stops the engine thread and the engine (idempotent). Synchronous, as vLLM's, so
        a server can call it after its event loop has stopped."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._thread.join(timeout=30.0)
        self._core.shutdown()
        self._fail_streams(EngineDeadError("the engine was shut down"))

    async def __aenter__(self) -> AsyncLLM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- input -------------------------------------------------------------------------

    def _tokenize(self, prompt: PromptType) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is an empty string")
            return self.tokenizer.encode(prompt), prompt
        if isinstance(prompt, dict) and set(prompt) == {"prompt_token_ids"}:
            ids = prompt["prompt_token_ids"]
            vocab_size = self._core.model_config.vocab_size
            ok = isinstance(ids, (list, tuple)) and len(ids) > 0
            ok = ok and all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids
            )
            if not ok:
                raise ValueError(
                    f"prompt_token_ids must be a non-empty list of ints in [0, {vocab_size}), "
                    f"got {ids!r}"
                )
            return list(ids), None
        raise ValueError(f'prompt must be a str or {{"prompt_token_ids": [...]}}, got {prompt!r}')

    # ---- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        core = self._core
        try:
            while not self._stopping.is_set():
                self._drain_commands(block=not core.has_unfinished_requests())
                # Stepped when idle too: the controller keeps reading the instances' load
                # reports and failures (a colocated step without requests does nothing).
                for output in core.step(_BUSY_WAIT_S):
                    self._deliver(output)
        except Exception as exc:  # noqa: BLE001 (every stream learns why, then the thread ends)
            logger.exception("the engine failed")
            self._dead = f"the engine failed: {exc!r}"
            self._fail_streams(EngineDeadError(self._dead))

    def _drain_commands(self, block: bool) -> None:
        try:
            commands = self._commands
            command = commands.get(timeout=_IDLE_WAIT_S) if block else commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, command: tuple) -> None:
        if command[0] == "abort":
            self._core.abort_request(command[1])
            return
        _, request_id, token_ids, params, text = command
        try:
            self._core.add_request(request_id, token_ids, params, prompt=text, stream=True)
        except (ValueError, NotImplementedError, EngineDeadError) as exc:
            self._send(request_id, exc)

    def _deliver(self, output: RequestOutput) -> None:
        # Both cores fill the text (StopChecker), holding back what may become a stop string.
        self._send(output.request_id, output)

    def _send(self, request_id: str, item: object) -> None:
        entry = self._streams.get(request_id)
        if entry is not None:
            loop, stream = entry
            loop.call_soon_threadsafe(stream.put_nowait, item)

    def _fail_streams(self, error: Exception) -> None:
        for request_id in list(self._streams):
            self._send(request_id, error)
