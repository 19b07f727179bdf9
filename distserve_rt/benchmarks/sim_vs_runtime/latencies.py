"""What one run of either side yields: per-request TTFT/TPOT and the row a report shows."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from distserve_rt.metrics.slo import SLO, attainment
from distserve_rt.outputs import RequestOutput
from distserve_rt.planner.simulator import BREAKDOWN


@dataclass(frozen=True)
class RunLatencies:
    """Per-request latencies of one run (s, float64 ``[num_requests]``; inf = failed)."""

    ttft: np.ndarray
    tpot: np.ndarray
    duration_s: float
    """First arrival to last finish."""
    extra: dict[str, float]
    """Side measurements (runtime: steps, mean host overhead per step)."""

    def row(self, slo: SLO) -> dict[str, float]:
        att = attainment(self.ttft, self.tpot, slo)
        ok = np.isfinite(self.ttft) & np.isfinite(self.tpot)
        return {
            "attainment": att.joint,
            "attainment_ttft": att.ttft,
            "attainment_tpot": att.tpot,
            "mean_ttft_s": float(self.ttft[ok].mean()) if ok.any() else float("inf"),
            "mean_tpot_s": float(self.tpot[ok].mean()) if ok.any() else float("inf"),
            "num_failed": int((~ok).sum()),
            "duration_s": self.duration_s,
            **self.extra,
        }


def latencies_from_outputs(
    outputs: Iterable[RequestOutput], num_requests: int, start: float, first_arrival: float
) -> RunLatencies:
    """The run of requests ``r0..r{n-1}`` from their final outputs (``start``: the replay's
    time zero on the engine's clock; ``first_arrival``: s after it).

    A request that did not end with its forced length (error, abort, or no final output)
    counts as failed (inf). A one-token output has TPOT 0, as the simulator counts it.
    Disaggregated outputs carry a latency breakdown: its means (ms) go into ``extra``, to
    show where a gap to the simulator comes from (e.g. the KV transfer's queueing).
    """
    ttft = np.full(num_requests, np.inf)
    tpot = np.full(num_requests, np.inf)
    end = start
    stages: dict[str, list[float]] = {}
    for out in outputs:
        i = int(out.request_id[1:])
        m = out.metrics
        end = max(end, m.finished_time or start)
        if out.outputs[0].finish_reason != "length" or m.ttft is None:
            continue
        ttft[i] = m.ttft
        tpot[i] = m.tpot or 0.0
        if m.breakdown is not None:
            for stage in BREAKDOWN:
                value = getattr(m.breakdown, stage)
                if value is not None:
                    stages.setdefault(stage, []).append(value)
    extra = {f"mean_{k}_ms": 1e3 * float(np.mean(v)) for k, v in stages.items()}
    return RunLatencies(ttft, tpot, end - start - first_arrival, extra)
