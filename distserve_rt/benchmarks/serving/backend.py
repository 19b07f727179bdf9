"""Backends: how a benchmark request reaches an engine. `Backend` is the seam; this module
holds the in-process one (an `EngineClient` in this process), `http_backend` the OpenAI one.
"""

from __future__ import annotations

import time
from typing import Protocol

from distserve_rt.benchmarks.serving.record import RequestRecord
from distserve_rt.benchmarks.serving.request_set import BenchRequest
from distserve_rt.engine.protocol import EngineClient
from distserve_rt.outputs import RequestOutput
from distserve_rt.sampling_params import SamplingParams


class Backend(Protocol):
    name: str
    """Written as ``backend`` in the result JSON."""

    async def send(self, request: BenchRequest, record: RequestRecord) -> None:
        """Sends ``request`` and fills ``record`` (start_time is already set) as it streams.

        Failures the engine or server reports are recorded (``record.fail``), not raised;
        anything raised is recorded by the runner. Cancellation (the per-request timeout)
        must stop the request on the engine side.
        """

    async def close(self) -> None:
        """Releases connections; the engine itself is owned by the caller."""


def forced_sampling_params(output_len: int, temperature: float = 0.0) -> SamplingParams:
    """Exactly ``output_len`` tokens: EOS ignored, ``max_tokens = min_tokens = output_len``."""
    return SamplingParams(
        temperature=temperature, max_tokens=output_len, min_tokens=output_len, ignore_eos=True
    )


class InProcessBackend:
    """Drives an `EngineClient` (`AsyncLLM`, colocated or disaggregated) directly.

    Each cumulative `RequestOutput` that brings new tokens is one "chunk": the first sets
    TTFT, the others add an ITL gap. The engine's `RequestMetrics` (queueing, its own
    TTFT/TPOT) is kept in the record for the latency breakdown.
    """

    name = "distserve_rt"

    def __init__(self, engine: EngineClient, *, temperature: float = 0.0) -> None:
        self.engine = engine
        self.temperature = temperature

    async def send(self, request: BenchRequest, record: RequestRecord) -> None:
        params = forced_sampling_params(request.output_len, self.temperature)
        prompt = {"prompt_token_ids": request.prompt_token_ids}
        stream = self.engine.generate(prompt, params, request.request_id)
        final: RequestOutput | None = None
        last_chunk = 0.0
        try:
            async for output in stream:
                now = time.perf_counter()
                num_tokens = len(output.outputs[0].token_ids) if output.outputs else 0
                if num_tokens > record.output_len:
                    if record.output_len == 0:
                        record.ttft = now - record.start_time
                    else:
                        record.itl.append(now - last_chunk)
                    last_chunk, record.output_len = now, num_tokens
                final = output
        finally:
            # Closing the iterator aborts the request (EngineClient contract), so a timeout
            # does not leave it running and holding KV blocks.
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        record.e2e = time.perf_counter() - record.start_time
        _finish(record, final)

    async def close(self) -> None:
        return None


def _finish(record: RequestRecord, final: RequestOutput | None) -> None:
    if final is None:
        record.fail("the engine ended the stream without any output")
        return
    record.engine_metrics = final.metrics
    reason = final.outputs[0].finish_reason if final.outputs else None
    if final.error is not None or reason == "error":
        record.fail(final.error or "the engine reported finish_reason 'error'")
    elif not final.finished:
        record.fail("the engine ended the stream before the request finished")
    elif record.output_len == 0:
        record.fail(f"the request finished ({reason}) without generating a token")
    else:
        record.success = True
        record.generated_text = final.outputs[0].text
