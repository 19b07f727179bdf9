"""What a simulation returns: per-request timestamps, latencies and the latency breakdown."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distserve_rt.metrics.slo import SLO, LatencySummary, summarize

BREAKDOWN = (
    "prefill_queue",
    "prefill",
    "transfer_queue",
    "transfer",
    "decode_queue",
    "decode",
)


@dataclass(frozen=True, eq=False)
class SimResult:
    """Per-request timestamps (s, float64 ``[num_requests]``; ``inf`` = never happened).

    Colocated runs have no transfer: their ``transfer_*`` equal ``prefill_end`` and
    ``decode_start`` is the first decode step after the first token.
    """

    arrival: np.ndarray
    prefill_start: np.ndarray
    prefill_end: np.ndarray
    """Also the first token's time."""
    transfer_start: np.ndarray
    transfer_end: np.ndarray
    decode_start: np.ndarray
    finish: np.ndarray
    output_lens: np.ndarray
    token_delay_s: float = 0.0
    """A token reaches the user this long after the step that made it (a disaggregated
    instance's hop to the controller, `ProcessHops.token_s`): TTFT includes it, TPOT does
    not (every token is late by the same)."""

    @property
    def num_requests(self) -> int:
        return int(self.arrival.size)

    @property
    def ttft(self) -> np.ndarray:
        return self.prefill_end + self.token_delay_s - self.arrival

    @property
    def tpot(self) -> np.ndarray:
        """Mean time per output token after the first (0 for one-token outputs)."""
        steps = np.maximum(self.output_lens - 1, 1)
        with np.errstate(invalid="ignore"):
            tpot = (self.finish - self.prefill_end) / steps
        tpot = np.where(self.output_lens > 1, tpot, 0.0)
        return np.where(np.isfinite(self.finish), tpot, np.inf)

    def breakdown(self) -> dict[str, np.ndarray]:
        """Seconds each request spent in each stage (``BREAKDOWN`` keys, ``[num_requests]``)."""
        return {
            "prefill_queue": self.prefill_start - self.arrival,
            "prefill": self.prefill_end - self.prefill_start,
            "transfer_queue": self.transfer_start - self.prefill_end,
            "transfer": self.transfer_end - self.transfer_start,
            "decode_queue": self.decode_start - self.transfer_end,
            "decode": self.finish - self.decode_start,
        }

    def mean_breakdown(self) -> dict[str, float]:
        ok = np.isfinite(self.finish)
        if not ok.any():
            return {k: float("inf") for k in BREAKDOWN}
        return {k: float(v[ok].mean()) for k, v in self.breakdown().items()}

    def summary(self, slo: SLO) -> LatencySummary:
        finish = self.finish[np.isfinite(self.finish)]
        end = float(finish.max()) if finish.size else float(self.arrival.max())
        duration = max(end - float(self.arrival.min()), 1e-9)
        return summarize(self.ttft, self.tpot, slo, duration)


def empty_result(arrival: np.ndarray, output_lens: np.ndarray) -> dict[str, np.ndarray]:
    """Timestamp arrays all ``inf``, to be filled by a simulator."""
    n = arrival.size
    return {
        k: np.full(n, np.inf)
        for k in SimResult.__dataclass_fields__
        if k not in ("arrival", "output_lens", "token_delay_s")
    }
