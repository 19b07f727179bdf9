"""The serving benchmark behind `drt-run bench`.

``request_set`` (workload -> prompt ids, forced output lengths, arrivals) → ``backend`` /
``http_backend`` (in-process `EngineClient` or OpenAI HTTP streaming, one `RequestRecord`
per request) → ``runner`` (open-loop sends at arrival times) → ``metrics`` (latency,
throughput, SLO attainment, goodput, SLO scale) → ``report`` (vLLM-compatible JSON and
table) → ``sweep`` (several rates, per-device goodput search) → ``plot`` (attainment vs rate).
"""

from distserve_rt.benchmarks.serving.backend import Backend, InProcessBackend
from distserve_rt.benchmarks.serving.http_backend import OpenAIHTTPBackend
from distserve_rt.benchmarks.serving.metrics import ServingMetrics, compute_metrics
from distserve_rt.benchmarks.serving.record import RequestRecord
from distserve_rt.benchmarks.serving.request_set import BenchRequest, RequestSet, build_requests
from distserve_rt.benchmarks.serving.runner import EventLoop, RunOutput, run_requests
from distserve_rt.benchmarks.serving.sweep import BenchSettings, ServingBenchmark

__all__ = [
    "Backend",
    "BenchRequest",
    "BenchSettings",
    "EventLoop",
    "InProcessBackend",
    "OpenAIHTTPBackend",
    "RequestRecord",
    "RequestSet",
    "RunOutput",
    "ServingBenchmark",
    "ServingMetrics",
    "build_requests",
    "compute_metrics",
    "run_requests",
]
