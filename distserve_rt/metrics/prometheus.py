"""Prometheus metrics of the HTTP server: request latencies, token counts, and the engine's
per-instance queues, KV usage and KV-transfer totals.

Each app gets its own `CollectorRegistry` (several servers in one process, as in tests, do
not collide). Latencies are measured in the server, from the moment a request is received
to the moment its outputs reach the handler, so they are what a client sees minus the
network. Engine state is read by `EngineStatsCollector` at scrape time from
``engine.stats()``: nothing is cached that could go stale.

Our names start with ``distserve_`` (per-instance roles, KV transfers, rejections); the
common serving metrics are also exposed under vLLM's names and labels
(`distserve_rt.metrics.vllm_names`) so vLLM dashboards work unchanged. Times are seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from distserve_rt.engine.protocol import EngineStats
from distserve_rt.metrics.vllm_names import VllmRequestMetrics, engine_gauges

# Buckets span a tiny CPU model (sub-millisecond steps) and GPU serving of large models
# (TTFT of seconds under load): roughly 1-2.5-5 per decade.
TTFT_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.75, 1.0, 1.5, 2.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
TOKEN_GAP_BUCKETS_S = (
    0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
)  # fmt: skip
E2E_BUCKETS_S = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0,
)  # fmt: skip


class PrometheusMetrics:
    """The server's metric objects, registered on a fresh registry."""

    def __init__(
        self, stats: Callable[[], EngineStats] | None = None, model_name: str = "unknown"
    ) -> None:
        """`model_name`: the served model name, vLLM's ``model_name`` label."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.vllm = VllmRequestMetrics(r, model_name)
        self.ttft = Histogram(
            "distserve_time_to_first_token_seconds",
            "Time from receiving a request to its first generated token.",
            buckets=TTFT_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "distserve_time_per_output_token_seconds",
            "Per request: (last token time - first token time) / (output tokens - 1).",
            buckets=TOKEN_GAP_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "distserve_inter_token_latency_seconds",
            "Gap between consecutive generated tokens (an output bringing k tokens after a "
            "gap g counts k gaps of g/k).",
            buckets=TOKEN_GAP_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "distserve_e2e_request_latency_seconds",
            "Time from receiving a request to its last output.",
            buckets=E2E_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.queue_time = Histogram(
            "distserve_request_queue_time_seconds",
            "Engine-reported time from arrival to first scheduling.",
            buckets=TTFT_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "distserve_requests", "Finished requests by finish reason "
            "(stop, length, abort, error).", ["finish_reason"], registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "distserve_requests_rejected", "Requests the engine or the server's "
            "concurrency limit refused at admission, by HTTP status (429, 503, 400).",
            ["status"], registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "distserve_prompt_tokens", "Prompt tokens of finished requests.", registry=r
        )
        self.generation_tokens = Counter(
            "distserve_generation_tokens", "Generated tokens of finished requests.", registry=r
        )
        self.in_flight = Gauge(
            "distserve_http_requests_in_flight", "Generation requests being served.", registry=r
        )
        if stats is not None:
            r.register(EngineStatsCollector(stats, model_name))

    def track(self) -> RequestTracker:
        """A tracker for one request, started now."""
        return RequestTracker(self)


class RequestTracker:
    """Timing of one request as its outputs arrive; records everything once, at `finish`."""

    def __init__(self, metrics: PrometheusMetrics) -> None:
        self._metrics = metrics
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.num_output_tokens = 0
        self._done = False

    def observe(self, num_output_tokens: int) -> None:
        """Called with the request's cumulative output token count at every output."""
        num_new = num_output_tokens - self.num_output_tokens
        if num_new <= 0:
            return
        now = time.perf_counter()
        if self.first_token_time is None:
            self.first_token_time = now
            self._metrics.ttft.observe(now - self.arrival_time)
            self._metrics.vllm.ttft.observe(now - self.arrival_time)
            num_new -= 1  # the first token has no gap before it
        elif num_new > 0:
            gap = (now - self.last_token_time) / num_new
            for _ in range(num_new):
                self._metrics.itl.observe(gap)
            self._metrics.vllm.observe_gaps(gap, num_new)
        self.last_token_time = now
        self.num_output_tokens = num_output_tokens

    def finish(
        self, finish_reason: str, num_prompt_tokens: int, queue_time_s: float | None = None
    ) -> None:
        """Records the request's end; later calls are ignored (one request, one count)."""
        if self._done:
            return
        self._done = True
        m, v = self._metrics, self._metrics.vllm
        m.requests.labels(finish_reason=finish_reason).inc()
        m.prompt_tokens.inc(num_prompt_tokens)
        m.generation_tokens.inc(self.num_output_tokens)
        v.prompt_tokens.inc(num_prompt_tokens)
        v.generation_tokens.inc(self.num_output_tokens)
        if finish_reason in v.success:  # "error" is no success
            v.success[finish_reason].inc()
        e2e = time.perf_counter() - self.arrival_time
        m.e2e.observe(e2e)
        v.e2e.observe(e2e)
        if self.num_output_tokens >= 2:
            span = self.last_token_time - self.first_token_time
            m.tpot.observe(span / (self.num_output_tokens - 1))
            v.request_tpot.observe(span / (self.num_output_tokens - 1))
        if queue_time_s is not None:
            m.queue_time.observe(queue_time_s)
            v.queue_time.observe(queue_time_s)


class EngineStatsCollector(Collector):
    """Per-instance gauges and KV-transfer counters from ``engine.stats()`` at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str = "unknown") -> None:
        self._stats = stats
        self._model_name = model_name

    def describe(self) -> Iterable[Metric]:
        # Without describe(), registering would call collect() (and engine.stats()) once.
        return []

    def collect(self) -> Iterable[Metric]:
        stats = self._stats()
        labels = ["instance", "role"]
        running = GaugeMetricFamily(
            "distserve_instance_num_requests_running", "Requests in the instance's running "
            "batch.", labels=labels,
        )  # fmt: skip
        waiting = GaugeMetricFamily(
            "distserve_instance_num_requests_waiting", "Requests queued at the instance.",
            labels=labels,
        )  # fmt: skip
        kv_usage = GaugeMetricFamily(
            "distserve_instance_kv_cache_usage_ratio", "Fraction of the instance's KV blocks "
            "in use (0..1).", labels=labels,
        )  # fmt: skip
        alive = GaugeMetricFamily(
            "distserve_instance_alive", "1 while the instance serves, 0 once it is gone.",
            labels=labels,
        )  # fmt: skip
        # vLLM's prefix_cache_queries / prefix_cache_hits: hit rate = hits / queries.
        queries = CounterMetricFamily(
            "distserve_instance_prefix_cache_queries", "Prompt tokens looked up in the "
            "instance's prefix cache.", labels=labels,
        )  # fmt: skip
        hits = CounterMetricFamily(
            "distserve_instance_prefix_cache_hits", "Prompt tokens found in the instance's "
            "prefix cache (prefill skipped).", labels=labels,
        )  # fmt: skip
        for inst in stats.instances:
            key = [inst.name, inst.role]
            running.add_metric(key, inst.num_running)
            waiting.add_metric(key, inst.num_waiting)
            kv_usage.add_metric(key, inst.kv_usage)
            alive.add_metric(key, 1.0 if inst.alive else 0.0)
            queries.add_metric(key, inst.prefix_cache_queries)
            hits.add_metric(key, inst.prefix_cache_hits)
        yield from (running, waiting, kv_usage, alive, queries, hits)
        yield from _disagg_reuse_metrics(stats)
        yield from _transfer_metrics(stats)
        yield from engine_gauges(stats, self._model_name)


def _disagg_reuse_metrics(stats: EngineStats) -> Iterable[Metric]:
    """Decode-side reuse and conditional disaggregation: per instance, prefills run where
    (``where="disaggregated"`` on prefill instances, ``"local"`` on decode instances) and
    migrated KV blocks copied vs found in the decode instance's prefix cache. Nothing for
    colocated instances."""
    prefills = CounterMetricFamily(
        "distserve_instance_prefills", "Prefills the instance ran (where: disaggregated on a "
        "prefill instance, local on a decode instance).", labels=["instance", "role", "where"],
    )  # fmt: skip
    pulled = CounterMetricFamily(
        "distserve_instance_kv_blocks_transferred", "KV blocks the decode instance's "
        "migrations copied from prefill instances.", labels=["instance", "role"],
    )  # fmt: skip
    reused = CounterMetricFamily(
        "distserve_instance_kv_blocks_reused", "Migrated KV blocks the decode instance found "
        "in its own prefix cache instead of copying them.", labels=["instance", "role"],
    )  # fmt: skip
    for inst in stats.instances:
        if inst.role == "prefill":
            prefills.add_metric([inst.name, inst.role, "disaggregated"], inst.num_prefills)
        elif inst.role == "decode":
            prefills.add_metric([inst.name, inst.role, "local"], inst.num_prefills)
            pulled.add_metric([inst.name, inst.role], inst.num_blocks_pulled)
            reused.add_metric([inst.name, inst.role], inst.num_blocks_reused)
    yield from (prefills, pulled, reused)


def _transfer_metrics(stats: EngineStats) -> Iterable[Metric]:
    t = stats.transfers
    label = ["transport"]
    specs = (
        ("distserve_kv_transfers", "KV transfers from prefill to decode instances.",
         t.num_transfers),
        ("distserve_kv_transfer_failures", "KV transfers that failed.", t.num_failures),
        ("distserve_kv_transfer_bytes", "Bytes of KV cache transferred.", t.bytes),
        ("distserve_kv_transfer_seconds", "Seconds spent in KV transfers.", t.seconds),
    )  # fmt: skip
    for name, doc, value in specs:
        family = CounterMetricFamily(name, doc, labels=label)
        family.add_metric([t.transport], value)
        yield family
