"""The common serving metrics under vLLM's names, labels and buckets, beside ours.

Dashboards and alerts written for vLLM select ``vllm:*`` series by ``model_name`` (the
served model name) and ``engine`` (vLLM's engine index; one engine here, "0"). The values
come from the same measurements as the ``distserve_*`` ones (`RequestTracker` in the
server, `EngineStats` at scrape time), so the two families always agree.

Bucket lists are vLLM's (v1 `vllm/v1/metrics/loggers.py`), so ``histogram_quantile`` gives
the same answers on both. vLLM's ``vllm:time_per_output_token_seconds`` is its deprecated
name of ``vllm:inter_token_latency_seconds`` (the same per-token gaps); the per-request
TPOT is ``vllm:request_time_per_output_token_seconds``.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from distserve_rt.engine.protocol import EngineStats

ENGINE_INDEX = "0"
LABELS = ["model_name", "engine"]

TTFT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
TOKEN_GAP_BUCKETS_S = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS_S = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip

FINISHED_REASONS = ("stop", "length", "abort")
"""vLLM's `request_success` reasons; a request that failed ("error") is not a success."""


class VllmRequestMetrics:
    """Per-request histograms and counters, bound to one model name."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        labels = (model_name, ENGINE_INDEX)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, LABELS, buckets=buckets, registry=registry).labels(*labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, LABELS, registry=registry).labels(*labels)

        self.ttft = histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS_S,
        )
        self.itl = histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            TOKEN_GAP_BUCKETS_S,
        )
        self.tpot_deprecated = histogram(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds (vLLM's deprecated name of "
            "vllm:inter_token_latency_seconds; the same gaps).",
            TOKEN_GAP_BUCKETS_S,
        )
        self.request_tpot = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            TOKEN_GAP_BUCKETS_S,
        )
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        )
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*LABELS, "finished_reason"],
            registry=registry,
        )
        # Every reason exists from the start (at 0), as in vLLM: rate() needs the series.
        self.success = {r: success.labels(*labels, r) for r in FINISHED_REASONS}

    def observe_gaps(self, gap_s: float, count: int) -> None:
        for _ in range(count):
            self.itl.observe(gap_s)
            self.tpot_deprecated.observe(gap_s)


def engine_gauges(stats: EngineStats, model_name: str) -> Iterable[Metric]:
    """vLLM's scheduler gauges for the whole engine, from the per-instance stats.

    Disaggregated, a request sits in one instance's queues at a time: a prefill instance
    drops it from its scheduler when its first token is out; from then on it is counted by
    its decode instance (waiting while its migration waits for room, running once its KV
    has landed). So the sums over live instances count each request once; only a request
    whose KV is being pulled (milliseconds) is in neither. KV usage is the fullest live pool's:
    summing fractions would count a migrating request's KV twice (it is held at both ends
    until pulled) and exceed 1, and a mean would hide a full decode pool, the one that
    refuses work, behind idle prefill pools. Colocated there is one instance: its values.
    Disaggregated values are as of each instance's last status report (sent every
    ``DisaggConfig.stats_interval_s``), like the ``distserve_instance_*`` gauges.
    """
    live = [s for s in stats.instances if s.alive]
    labels = [model_name, ENGINE_INDEX]
    specs = (
        ("vllm:num_requests_running", "Number of requests in model execution batches.",
         sum(s.num_running for s in live)),
        ("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
         sum(s.num_waiting for s in live)),
        ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
         max((s.kv_usage for s in live), default=0.0)),
        ("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage "
         "(vLLM's older name of vllm:kv_cache_usage_perc).",
         max((s.kv_usage for s in live), default=0.0)),
    )  # fmt: skip
    for name, doc, value in specs:
        family = GaugeMetricFamily(name, doc, labels=LABELS)
        family.add_metric(labels, value)
        yield family
    # Counters since start over every instance, dead ones included (their last report
    # stays in the stats), so the sums never go down. Prompt lookups are counted where
    # prompts are prefilled (prefill and colocated instances): a decode instance looks a
    # migrated prompt up again to pull only the delta, which would count its tokens twice;
    # that reuse has its own metric (distserve_instance_kv_blocks_reused).
    prompt_side = [s for s in stats.instances if s.role != "decode"]
    counters = (
        ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried "
         "tokens.", sum(s.prefix_cache_queries for s in prompt_side)),
        ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
         sum(s.prefix_cache_hits for s in prompt_side)),
    )  # fmt: skip
    for name, doc, value in counters:
        family = CounterMetricFamily(name, doc, labels=LABELS)
        family.add_metric(labels, value)
        yield family
