"""`RequestRecord`: what one benchmark request measured, the same for every backend."""

from __future__ import annotations

from dataclasses import dataclass, field

from distserve_rt.outputs import RequestMetrics


@dataclass(slots=True)
class RequestRecord:
    """One request as the client saw it. Times are seconds (``time.perf_counter`` based).

    ``ttft`` is from sending to the first content chunk; ``itl`` has one gap per later chunk
    (a chunk may carry several tokens, so ``len(itl)`` can be below ``output_len - 1``);
    ``e2e`` is from sending to the last byte.
    """

    request_id: str
    prompt_len: int
    expected_output_len: int
    start_time: float = 0.0
    """``perf_counter()`` when the request was sent."""
    success: bool = False
    error: str = ""
    output_len: int = 0
    """Tokens generated (the usage chunk's completion_tokens over HTTP)."""
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    e2e: float = 0.0
    generated_text: str = ""
    engine_metrics: RequestMetrics | None = None
    """The engine's own lifecycle times (in-process backend only)."""

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first: ``(e2e - ttft) / (output_len - 1)``.

        0 for a one-token output (no decode step), as `distserve_rt.metrics.slo` scores it.
        """
        if self.output_len <= 1:
            return 0.0
        return (self.e2e - self.ttft) / (self.output_len - 1)

    def fail(self, error: str) -> RequestRecord:
        """Mark failed with ``error`` (kept when one is already set); returns self."""
        self.success = False
        self.error = self.error or error
        return self
