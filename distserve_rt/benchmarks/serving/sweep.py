"""Runs at one or more rates, and the per-device goodput search over measured runs.

Every run replays the same requests (same lengths and token ids, seeded), only their
arrival gaps scale with ``1 / rate``, so attainment is compared across rates on the same
work. The goodput search is `distserve_rt.metrics.search_rate` (the planner's bracket and
bisection) with a measured run as "rate -> attainment".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from distserve_rt.benchmarks.serving.backend import Backend
from distserve_rt.benchmarks.serving.metrics import ServingMetrics, compute_metrics
from distserve_rt.benchmarks.serving.report import RunInfo, json_number, result_json
from distserve_rt.benchmarks.serving.request_set import build_requests
from distserve_rt.benchmarks.serving.runner import EventLoop, RunOutput, run_requests
from distserve_rt.metrics.rate_search import search_rate
from distserve_rt.metrics.slo import SLO
from distserve_rt.workloads.workload import Workload


class BenchmarkAborted(RuntimeError):
    """A run in which no request succeeded: searching further would only wait longer."""


@dataclass(frozen=True)
class BenchSettings:
    """How every run of a benchmark is sent and scored."""

    slo: SLO
    target: float = 0.9
    """SLO attainment target, (0, 1]."""
    burstiness: float = 1.0
    seed: int = 0
    timeout_s: float | None = None
    """Per-request limit, seconds; None waits forever."""
    max_concurrency: int | None = None
    disable_tqdm: bool = False
    goodput_ms: dict[str, float] | None = None
    """``--goodput``: vLLM's per-metric objectives (ms) for request_goodput; None: the SLO."""

    def __post_init__(self) -> None:
        if not 0 < self.target <= 1:
            raise ValueError(f"target must be in (0, 1], got {self.target!r}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness!r}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds or None, got {self.timeout_s!r}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency!r}")


@dataclass(frozen=True)
class RunResult:
    rate: float
    source: str
    """"sweep" (a rate asked for) or "search" (tried by the goodput search)."""
    metrics: ServingMetrics
    result: dict[str, Any]
    """The vLLM-compatible JSON of the run (`report.result_json`)."""

    def summary(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "request_rate": json_number(self.rate),
            "source": self.source,
            "completed": m.completed,
            "failed": m.failed,
            "attainment": self.result["attainment"],
            "request_goodput": m.request_goodput,
            "request_throughput": m.request_throughput,
            "slo_scale": json_number(m.slo_scale),
            "p90_ttft_ms": m.ttft.p90,
            "p90_tpot_ms": m.tpot.p90,
        }


@dataclass(frozen=True)
class GoodputSearchResult:
    rate: float
    """Highest measured rate with attainment >= target (req/s); 0 if none."""
    num_devices: int
    curve: list[tuple[float, float]] = field(default_factory=list)
    """(rate, joint attainment) of every rate the search ran, sorted by rate."""

    @property
    def per_device(self) -> float:
        return self.rate / self.num_devices


class ServingBenchmark:
    """One workload, one backend, one event loop: runs at rates and searches goodput."""

    def __init__(
        self,
        backend: Backend,
        workload: Workload,
        info: RunInfo,
        settings: BenchSettings,
        *,
        vocab_size: int,
        special_ids: list[int],
        max_model_len: int,
        loop: EventLoop,
        prompts: list[list[int]] | None = None,
    ) -> None:
        """``prompts``: the workload's own prompt ids, row for row (a ShareGPT file's
        prompts), sent instead of random ids; the warm-up still uses random ids."""
        self.backend, self.workload, self.info, self.settings = backend, workload, info, settings
        self._token_args = dict(
            vocab_size=vocab_size, special_ids=special_ids, max_model_len=max_model_len
        )
        self.prompts = prompts
        self.loop = loop
        self.runs: list[RunResult] = []

    def warm_up(self, num_requests: int, max_tokens: int = 8) -> None:
        """Sends the first ``num_requests`` requests at once (at most ``max_tokens`` output
        tokens each) and discards them, as ``vllm bench serve --num-warmups`` does: a fresh
        engine's first steps pay one-time costs (allocations, the first KV pull, worker
        wake-up) that would otherwise land on whichever run comes first.

        Raises `BenchmarkAborted` when a warm-up request fails (the runs would fail too)."""
        if num_requests < 0:
            raise ValueError(f"num_requests must be >= 0, got {num_requests!r}")
        if num_requests == 0:
            return
        warm = self.workload.sample(num_requests, seed=self.settings.seed)
        warm = replace(warm, output_lens=warm.output_lens.clip(max=max_tokens))
        request_set = build_requests(
            warm, rate=math.inf, seed=self.settings.seed, id_prefix="warmup-", **self._token_args
        )
        run = self.loop.run(run_requests(self.backend, request_set, disable_tqdm=True))
        failed = [r.error for r in run.records if not r.success]
        if failed:
            raise BenchmarkAborted(f"{len(failed)} warm-up request(s) failed: {failed[0]}")

    def run_at(self, rate: float, source: str = "sweep") -> RunResult:
        """Sends the workload at ``rate`` req/s (inf: all at once) and scores it."""
        s = self.settings
        request_set = build_requests(
            self.workload,
            rate=rate,
            burstiness=s.burstiness,
            seed=s.seed,
            prompts=self.prompts,
            **self._token_args,
        )
        run: RunOutput = self.loop.run(
            run_requests(
                self.backend,
                request_set,
                timeout_s=s.timeout_s,
                max_concurrency=s.max_concurrency,
                disable_tqdm=s.disable_tqdm,
                desc=f"{self.info.label} @ {rate:g} req/s",
            )
        )
        metrics = compute_metrics(
            run.records,
            run.duration_s,
            s.slo,
            s.target,
            percentiles=self.info.metric_percentiles,
            goodput_ms=s.goodput_ms,
        )
        info = replace(self.info, request_rate=rate, num_clipped=request_set.num_clipped)
        result = RunResult(rate, source, metrics, result_json(info, run, metrics))
        self.runs.append(result)
        return result

    def goodput_search(
        self,
        *,
        num_devices: int,
        rate_hint: float = 1.0,
        rel_tol: float = 0.1,
        min_rate: float = 0.05,
        max_rate: float = 1000.0,
    ) -> GoodputSearchResult:
        """Highest rate meeting the attainment target, by bracket + bisection over runs.

        Raises `BenchmarkAborted` when a run has no successful request (a dead server or a
        misconfiguration, not a rate that is too high).
        """
        if num_devices < 1:
            raise ValueError(f"num_devices must be >= 1, got {num_devices!r}")
        if not math.isfinite(rate_hint) or rate_hint <= 0:
            raise ValueError(f"rate_hint must be a finite rate > 0, got {rate_hint!r}")
        measured = {r.rate: r for r in self.runs}

        def attainment_at(rate: float) -> float:
            run = measured.get(rate) or self.run_at(rate, source="search")
            if run.metrics.completed == 0:
                first = next((e for e in run.result["errors"] if e), "")
                raise BenchmarkAborted(f"no request succeeded at {rate:g} req/s: {first}")
            return run.metrics.attainment.joint

        rate, seen = search_rate(
            attainment_at,
            self.settings.target,
            rate_hint=rate_hint,
            rel_tol=rel_tol,
            min_rate=min_rate,
            max_rate=max_rate,
        )
        return GoodputSearchResult(rate, num_devices, sorted(seen.items()))


def sweep_json(
    bench: ServingBenchmark, search: GoodputSearchResult | None, provenance: dict[str, Any]
) -> dict[str, Any]:
    """Every run's summary, the goodput search and provenance: what `plot` overlays."""
    s = bench.settings
    out: dict[str, Any] = {
        "label": bench.info.label,
        "backend": bench.info.backend,
        "model_id": bench.info.model_id,
        "num_prompts": bench.workload.num_requests,
        "burstiness": s.burstiness,
        "slo": {"ttft_ms": 1000 * s.slo.ttft_s, "tpot_ms": 1000 * s.slo.tpot_s, "target": s.target},
        "runs": [r.summary() for r in sorted(bench.runs, key=lambda r: r.rate)],
        "goodput_search": None,
        "provenance": provenance,
    }
    if search is not None:
        out["goodput_search"] = {
            "rate": search.rate,
            "num_devices": search.num_devices,
            "per_device_goodput": search.per_device,
            "curve": search.curve,
        }
    return out
