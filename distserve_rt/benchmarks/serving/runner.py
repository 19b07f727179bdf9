"""The runner: sends a `RequestSet` through a `Backend` at its arrival times (asyncio).

Each request is its own task, started at its arrival offset whether or not earlier ones
have finished (an open-loop load, as the paper and ``vllm bench serve`` measure), bounded
by a per-request timeout. A failure or timeout is recorded in the request's record and
counted; it never stops the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from tqdm.auto import tqdm

from distserve_rt.benchmarks.serving.backend import Backend
from distserve_rt.benchmarks.serving.record import RequestRecord
from distserve_rt.benchmarks.serving.request_set import BenchRequest, RequestSet

T = TypeVar("T")


@dataclass(frozen=True)
class RunOutput:
    """The records of one run (in request order) and its duration."""

    records: list[RequestRecord]
    duration_s: float
    """From the first send to the last request's end (seconds)."""
    start_time: float
    """``perf_counter()`` at the first send."""


async def _send_one(
    backend: Backend,
    request: BenchRequest,
    timeout_s: float | None,
    semaphore: asyncio.Semaphore | contextlib.nullcontext,
) -> RequestRecord:
    record = RequestRecord(request.request_id, request.prompt_len, request.output_len)
    async with semaphore:
        record.start_time = time.perf_counter()
        try:
            await asyncio.wait_for(backend.send(request, record), timeout_s)
        except asyncio.TimeoutError:
            record.fail(f"timed out after {timeout_s:g} s")
        except Exception as exc:  # noqa: BLE001 - a failed request is data, not a crash
            record.fail(f"{type(exc).__name__}: {exc}")
        if not record.e2e:
            record.e2e = time.perf_counter() - record.start_time
    return record


async def run_requests(
    backend: Backend,
    request_set: RequestSet,
    *,
    timeout_s: float | None = None,
    max_concurrency: int | None = None,
    disable_tqdm: bool = False,
    desc: str = "",
) -> RunOutput:
    """Sends every request at ``start + arrival_s``; returns when all have ended."""
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s!r}")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1 or None, got {max_concurrency!r}")
    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    pbar = tqdm(total=len(request_set.requests), desc=desc, disable=disable_tqdm)
    start = time.perf_counter()
    tasks: list[asyncio.Task[RequestRecord]] = []
    for request in request_set.requests:
        delay = start + request.arrival_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(_send_one(backend, request, timeout_s, semaphore))
        task.add_done_callback(lambda _t: pbar.update(1))
        tasks.append(task)
    records = list(await asyncio.gather(*tasks))
    duration = time.perf_counter() - start
    pbar.close()
    return RunOutput(records, duration, start)


class EventLoop:
    """One event loop for every run of a sweep: an in-process engine's background tasks
    live on the loop they started on, so runs must not each get a fresh ``asyncio.run``."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()

    def run(self, coro: Awaitable[T]) -> T:
        return self._loop.run_until_complete(coro)

    def close(self) -> None:
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    def __enter__(self) -> EventLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
