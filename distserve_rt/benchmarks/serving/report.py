"""One run's result as ``vllm bench serve`` prints and saves it, plus our SLO keys.

`result_json` has every top-level key of ``vllm bench serve --save-result --save-detailed``
(date, backend, model_id, tokenizer_id, num_prompts, request_rate, burstiness,
max_concurrency, duration, completed, failed, total_input_tokens, total_output_tokens,
request_throughput, request_goodput, output_throughput, total_token_throughput, input_lens,
output_lens, ttfts, itls, latencies, generated_texts, errors, {mean,median,std,pNN}_
{ttft,tpot,itl,e2el}_ms), so tools that read vLLM's files read ours; our additions are listed
in `EXTRA_KEYS`. Latencies in the per-request lists are seconds, as vLLM writes them.

Which latency keys exist follows ``--percentile-metrics``/``--metric-percentiles`` as in
vLLM; our defaults are all four metrics at p50/p90/p99 (vLLM's: ttft,tpot,itl at p99), a
superset, so a reader of vLLM's default keys finds them. Two differences, on purpose:
request_goodput without ``--goodput`` is the rate meeting both SLOs (vLLM writes null),
and with it the objectives are saved under ``goodput``.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any

from distserve_rt.benchmarks.serving.metrics import (
    REPORTED_PERCENTILES,
    LatencyStats,
    ServingMetrics,
    engine_breakdown_ms,
)
from distserve_rt.benchmarks.serving.runner import RunOutput
from distserve_rt.benchmarks.serving.vllm_flags import PERCENTILE_METRICS, percentile_word

EXTRA_KEYS = (
    "label",
    "num_clipped",
    "start_times",
    "slo",
    "attainment",
    "slo_scale",
    "engine_breakdown_ms",
    "goodput",
)

_METRIC_TITLES = (
    ("ttft", "TTFT", "Time to First Token"),
    ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl", "ITL", "Inter-token Latency"),
    ("e2el", "E2EL", "End-to-end Latency"),
)


@dataclass(frozen=True)
class RunInfo:
    """What identifies a run (the setup half of vLLM's result JSON)."""

    backend: str
    model_id: str
    tokenizer_id: str
    label: str
    request_rate: float
    burstiness: float
    max_concurrency: int | None
    num_clipped: int
    percentile_metrics: tuple[str, ...] = PERCENTILE_METRICS
    """``--percentile-metrics``: the latencies whose statistics are printed and saved."""
    metric_percentiles: tuple[float, ...] = REPORTED_PERCENTILES
    """``--metric-percentiles``: the ``pNN_<metric>_ms`` keys and ``PNN`` rows."""


def json_number(value: float | None) -> float | str | None:
    """Finite floats as they are; inf as "inf" (JSON has no infinity; vLLM writes a rate
    of inf the same way)."""
    if value is not None and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _latency_keys(
    name: str, stats: LatencyStats, percentiles: tuple[float, ...]
) -> dict[str, float | None]:
    out = {
        f"mean_{name}_ms": stats.mean,
        f"median_{name}_ms": stats.median,
        f"std_{name}_ms": stats.std,
    }
    for p in percentiles:
        out[f"p{percentile_word(p)}_{name}_ms"] = stats.percentiles.get(p)
    return out


def result_json(info: RunInfo, run: RunOutput, m: ServingMetrics) -> dict[str, Any]:
    """The vLLM-compatible result of one run (see the module docstring)."""
    records = run.records
    out: dict[str, Any] = {
        "date": dt.datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": info.backend,
        "label": info.label,
        "model_id": info.model_id,
        "tokenizer_id": info.tokenizer_id,
        "num_prompts": m.num_requests,
        "request_rate": json_number(info.request_rate),
        "burstiness": info.burstiness,
        "max_concurrency": info.max_concurrency,
        "duration": m.duration_s,
        "completed": m.completed,
        "failed": m.failed,
        "total_input_tokens": m.total_input_tokens,
        "total_output_tokens": m.total_output_tokens,
        "request_throughput": m.request_throughput,
        "request_goodput": m.request_goodput,
        "output_throughput": m.output_throughput,
        "total_token_throughput": m.total_token_throughput,
        "input_lens": [r.prompt_len for r in records],
        "output_lens": [r.output_len if r.success else 0 for r in records],
        "ttfts": [r.ttft if r.success else 0.0 for r in records],
        "itls": [list(r.itl) if r.success else [] for r in records],
        "latencies": [r.e2e if r.success else 0.0 for r in records],
        "generated_texts": [r.generated_text for r in records],
        "errors": [r.error for r in records],
        "start_times": [r.start_time - run.start_time for r in records],
    }
    for name, _, _ in _METRIC_TITLES:
        if name in info.percentile_metrics:  # vLLM saves only the selected metrics
            out.update(_latency_keys(name, getattr(m, name), info.metric_percentiles))
    if m.goodput_ms:
        out["goodput"] = dict(m.goodput_ms)
    out.update(
        num_clipped=info.num_clipped,
        slo={"ttft_ms": 1000 * m.slo.ttft_s, "tpot_ms": 1000 * m.slo.tpot_s, "target": m.target},
        attainment={
            "joint": m.attainment.joint,
            "ttft": m.attainment.ttft,
            "tpot": m.attainment.tpot,
        },
        slo_scale=json_number(m.slo_scale),
        engine_breakdown_ms=engine_breakdown_ms(records),
    )
    return out


def _row(name: str, value: object, fmt: str = "") -> str:
    text = "n/a" if value is None else format(value, fmt)
    return f"{name:<40} {text:<10}"


def format_table(info: RunInfo, m: ServingMetrics) -> str:
    """The metrics table, laid out like ``vllm bench serve`` prints it, with SLO rows."""
    lines = [
        "{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="),
        _row("Successful requests:", m.completed),
        _row("Failed requests:", m.failed),
    ]
    if info.max_concurrency is not None:
        lines.append(_row("Maximum request concurrency:", info.max_concurrency))
    if not math.isinf(info.request_rate):
        lines.append(_row("Request rate configured (RPS):", info.request_rate, ".2f"))
    lines += [
        _row("Benchmark duration (s):", m.duration_s, ".2f"),
        _row("Total input tokens:", m.total_input_tokens),
        _row("Total generated tokens:", m.total_output_tokens),
        _row("Request throughput (req/s):", m.request_throughput, ".2f"),
        _row("Request goodput (req/s):", m.request_goodput, ".2f"),
        *(
            [_row("Goodput SLOs (ms):", " ".join(f"{k}:{v:g}" for k, v in m.goodput_ms.items()))]
            if m.goodput_ms
            else []
        ),
        _row("Output token throughput (tok/s):", m.output_throughput, ".2f"),
        _row("Total Token throughput (tok/s):", m.total_token_throughput, ".2f"),
        "{s:{c}^{n}}".format(s="SLO Attainment", n=50, c="-"),
        _row("SLO TTFT / TPOT (ms):", f"{1000 * m.slo.ttft_s:g} / {1000 * m.slo.tpot_s:g}"),
        _row("Attainment, both SLOs (%):", 100 * m.attainment.joint, ".2f"),
        _row("Attainment, TTFT (%):", 100 * m.attainment.ttft, ".2f"),
        _row("Attainment, TPOT (%):", 100 * m.attainment.tpot, ".2f"),
        _row(f"SLO scale for {100 * m.target:g}% (x):", m.slo_scale, ".3f"),
    ]
    for name, short, title in _METRIC_TITLES:
        if name not in info.percentile_metrics:
            continue
        stats: LatencyStats = getattr(m, name)
        lines.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        lines.append(_row(f"Mean {short} (ms):", stats.mean, ".2f"))
        lines.append(_row(f"Median {short} (ms):", stats.median, ".2f"))
        for p in info.metric_percentiles:
            word = percentile_word(p)
            lines.append(_row(f"P{word} {short} (ms):", stats.percentiles.get(p), ".2f"))
    lines.append("=" * 50)
    return "\n".join(lines)
