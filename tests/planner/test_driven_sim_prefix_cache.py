"""The scheduler-driven simulators build the runtime's BlockManager with synthetic token ids
(every token the same): prefix caching must stay off there, or every prompt would hit a
cache the simulator does not model and its times would silently drop."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from distserve_rt.planner.latency_model import LatencyModel
from distserve_rt.planner.simulator import (
    DisaggSpec,
    KVTransferSpec,
    SchedulerDrivenColocated,
    SchedulerDrivenDisaggregated,
    SimInstanceSpec,
    driven_instance,
)


@dataclass(frozen=True)
class AffineLatency(LatencyModel):
    """Prefill time grows with the tokens computed: cached tokens would shorten it."""

    tp: int = 1

    def prefill_s(self, num_tokens: int, sum_sq_lens: int) -> float:
        return 0.01 + 1e-3 * num_tokens

    def decode_affine(self, batch_size: int) -> tuple[float, float]:
        return 0.005, 0.0


SPEC = SimInstanceSpec(AffineLatency(), 4096, max_batch_tokens=2048)
ARRIVAL, PROMPT, OUTPUT = [0.0, 0.5, 1.0, 1.5], [64, 64, 80, 96], [8, 8, 8, 8]


def run(kind: str):
    if kind == "disaggregated":
        spec = DisaggSpec(SPEC, SPEC, 1, 1, KVTransferSpec(0.0, 1e12))
        return SchedulerDrivenDisaggregated(spec).run(ARRIVAL, PROMPT, OUTPUT)
    return SchedulerDrivenColocated(SPEC, kind).run(ARRIVAL, PROMPT, OUTPUT)


def times(result) -> np.ndarray:
    return np.stack([result.prefill_start, result.prefill_end, result.finish])


@pytest.mark.parametrize("kind", ["continuous_batching", "chunked_prefill", "disaggregated"])
def test_simulated_times_ignore_prefix_caching(kind, monkeypatch):
    real = driven_instance.BlockManager
    built = []

    def spy(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(driven_instance, "BlockManager", spy)
    simulated = times(run(kind))
    assert built and not any(bm.enable_prefix_caching for bm in built)
    assert all(bm.stats().prefix_cache_queries == 0 for bm in built)

    # What the explicit "off" guards against: the same run with the cache on is faster.
    def cached(num_blocks, block_size, watermark, **kwargs):
        return real(num_blocks, block_size, watermark, enable_prefix_caching=True)

    monkeypatch.setattr(driven_instance, "BlockManager", cached)
    assert not np.allclose(times(run(kind)), simulated)
