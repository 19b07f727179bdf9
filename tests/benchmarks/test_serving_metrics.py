"""Serving metrics on hand-made records: TPOT, percentiles, attainment, goodput, SLO scale,
and the vLLM-compatible JSON keys."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from distserve_rt.benchmarks.serving.metrics import LatencyStats, compute_metrics
from distserve_rt.benchmarks.serving.record import RequestRecord
from distserve_rt.benchmarks.serving.report import RunInfo, format_table, result_json
from distserve_rt.benchmarks.serving.runner import RunOutput
from distserve_rt.metrics.slo import SLO

# The top-level keys `vllm bench serve --save-result --save-detailed` writes (vllm/benchmarks/
# serve.py) with the default percentile metrics ttft,tpot,itl plus e2el, percentile 99.
VLLM_KEYS = {
    "date", "backend", "model_id", "tokenizer_id", "num_prompts", "request_rate",
    "burstiness", "max_concurrency", "duration", "completed", "failed", "total_input_tokens",
    "total_output_tokens", "request_throughput", "request_goodput", "output_throughput",
    "total_token_throughput", "input_lens", "output_lens", "ttfts", "itls",
    "generated_texts", "errors",
    *(f"{s}_{m}_ms" for s in ("mean", "median", "std", "p99")
      for m in ("ttft", "tpot", "itl", "e2el")),
}  # fmt: skip


def rec(i, ttft, e2e, out_len, *, ok=True, prompt_len=10, itl=None):
    r = RequestRecord(f"r{i}", prompt_len, out_len, start_time=100.0 + i)
    r.success, r.ttft, r.e2e, r.output_len = ok, ttft, e2e, out_len if ok else 0
    r.itl = list(itl) if itl is not None else [(e2e - ttft) / max(out_len - 1, 1)] * (out_len - 1)
    if not ok:
        r.error = "boom"
    return r


def records():
    return [
        rec(0, 0.1, 1.0, 10),  # tpot 0.1
        rec(1, 0.2, 0.6, 5),  # tpot 0.1
        rec(2, 0.5, 0.9, 3),  # tpot 0.2 (misses tpot 0.15), ttft misses 0.3
        rec(3, 0.05, 0.05, 1),  # one token: tpot 0 by definition
        rec(4, 0.0, 2.0, 0, ok=False),
    ]


def test_tpot_definition():
    assert rec(0, 0.1, 1.0, 10).tpot == pytest.approx(0.9 / 9)
    assert rec(0, 0.3, 0.3, 1).tpot == 0.0


def test_latency_stats_match_numpy():
    values = [0.01, 0.02, 0.04, 0.08, 0.5]
    s = LatencyStats.of(values)
    ms = np.array(values) * 1000
    assert s.mean == pytest.approx(ms.mean()) and s.median == pytest.approx(40.0)
    assert s.std == pytest.approx(ms.std())
    assert s.p90 == pytest.approx(np.percentile(ms, 90)) and s.p99 == pytest.approx(
        np.percentile(ms, 99)
    )
    assert LatencyStats.of([]).mean is None


def test_metrics_attainment_goodput_and_failures():
    m = compute_metrics(records(), duration_s=2.0, slo=SLO(0.3, 0.15), target=0.6)
    assert (m.completed, m.failed, m.num_requests) == (4, 1, 5)
    assert m.total_input_tokens == 40 and m.total_output_tokens == 19
    assert m.request_throughput == pytest.approx(2.0)
    assert m.output_throughput == pytest.approx(9.5)
    assert m.total_token_throughput == pytest.approx(29.5)
    # Attainment counts the failure as a miss: 3 of 5 meet both.
    assert m.attainment.joint == pytest.approx(0.6)
    assert m.attainment.ttft == pytest.approx(0.6) and m.attainment.tpot == pytest.approx(0.6)
    assert m.request_goodput == pytest.approx(3 / 2.0)
    # TTFT over successes only; TPOT over outputs longer than one token.
    assert m.ttft.mean == pytest.approx(1000 * (0.1 + 0.2 + 0.5 + 0.05) / 4)
    assert m.tpot.median == pytest.approx(100.0)
    assert m.e2el.mean == pytest.approx(1000 * (1.0 + 0.6 + 0.9 + 0.05) / 4)
    # SLO scale: the ceil(0.6 * 5) = 3rd smallest of max(ttft/T, tpot/P) (failure: inf).
    ratios = sorted([0.1 / 0.15, 0.2 / 0.3, max(0.5 / 0.3, 0.2 / 0.15), 0.05 / 0.3, math.inf])
    assert m.slo_scale == pytest.approx(ratios[2]) == pytest.approx(2 / 3)
    assert compute_metrics(records(), 2.0, SLO(0.3, 0.15), target=1.0).slo_scale == math.inf


def test_all_failed_reports_no_latency_and_zero_attainment():
    bad = [rec(i, 0, 1.0, 0, ok=False) for i in range(3)]
    m = compute_metrics(bad, 1.0, SLO(1.0, 1.0))
    assert m.completed == 0 and m.attainment.joint == 0.0 and m.request_goodput == 0.0
    assert m.ttft.mean is None
    assert "n/a" in format_table(RunInfo("b", "m", "t", "l", 1.0, 1.0, None, 0), m)


def test_result_json_has_vllm_keys_and_is_valid_json():
    recs = records()
    m = compute_metrics(recs, 2.0, SLO(0.3, 0.15), target=1.0)
    info = RunInfo("distserve_rt", "model", "tok", "disagg", math.inf, 1.0, None, 2)
    out = result_json(info, RunOutput(recs, 2.0, 100.0), m)
    assert set(out) >= VLLM_KEYS
    assert out["request_rate"] == "inf" and out["slo_scale"] == "inf"
    assert out["output_lens"] == [10, 5, 3, 1, 0] and out["errors"][4] == "boom"
    assert out["start_times"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert out["p99_ttft_ms"] == m.ttft.p99 and out["num_clipped"] == 2
    assert out["attainment"]["joint"] == pytest.approx(0.6)
    assert json.loads(json.dumps(out, allow_nan=False))["slo"]["target"] == 1.0


def test_table_is_laid_out_like_vllm():
    m = compute_metrics(records(), 2.0, SLO(0.3, 0.15))
    table = format_table(RunInfo("b", "m", "t", "l", 4.0, 1.0, 8, 0), m)
    lines = table.splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert lines[-1] == "=" * 50
    assert any(line.startswith("Request goodput (req/s):") for line in lines)
    assert any(line.startswith("Request rate configured (RPS):") for line in lines)
    assert "P99 TPOT (ms):" in table and "Attainment, both SLOs (%):" in table
