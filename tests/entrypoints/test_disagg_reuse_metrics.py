"""The decode-side reuse and conditional disaggregation counters on /metrics: prefills per
instance labelled by where they ran, KV blocks transferred vs reused per decode instance,
nothing of them for colocated instances."""

from __future__ import annotations

import pytest

pytest.importorskip("prometheus_client")

from distserve_rt.engine.protocol import EngineStats, InstanceStats  # noqa: E402
from distserve_rt.metrics.prometheus import EngineStatsCollector  # noqa: E402


def _samples(stats: EngineStats) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in EngineStatsCollector(lambda: stats).collect()
        for s in family.samples
    }


def test_prefills_and_blocks_per_instance():
    decode_counts = dict(num_prefills=2, num_blocks_pulled=30, num_blocks_reused=12)
    stats = EngineStats(
        [
            InstanceStats("prefill-0", "prefill", 0, 0, 0.0, num_prefills=7),
            InstanceStats("decode-0", "decode", 0, 0, 0.0, **decode_counts),
        ]
    )
    m = _samples(stats)
    prefill, decode = (
        (("instance", "prefill-0"), ("role", "prefill")),
        (
            ("instance", "decode-0"),
            ("role", "decode"),
        ),
    )
    assert m[("distserve_instance_prefills_total", (*prefill, ("where", "disaggregated")))] == 7
    assert m[("distserve_instance_prefills_total", (*decode, ("where", "local")))] == 2
    assert m[("distserve_instance_kv_blocks_transferred_total", decode)] == 30
    assert m[("distserve_instance_kv_blocks_reused_total", decode)] == 12
    assert ("distserve_instance_kv_blocks_reused_total", prefill) not in m


def test_colocated_instances_have_none_of_them():
    m = _samples(EngineStats([InstanceStats("colocated-0", "colocated", 1, 0, 0.1)]))
    assert not [k for k in m if "prefills" in k[0] or "kv_blocks" in k[0]]
