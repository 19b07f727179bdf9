"""vLLM's metric names, labels and buckets beside ours, scraped from a live server
(AsyncLLM over dummy:llama-tiny, both placements) and parsed with prometheus_client's
text parser; the engine gauges' combination over disaggregated instances."""

from __future__ import annotations

import anyio
import pytest

# The HTTP server's dependencies: absent on the GPU machine, where these tests skip.
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from prometheus_client.parser import text_string_to_metric_families

from distserve_rt.config import DisaggConfig
from distserve_rt.engine.async_llm import AsyncLLM
from distserve_rt.engine.protocol import EngineStats, InstanceStats
from distserve_rt.entrypoints.openai import build_app
from distserve_rt.metrics import vllm_names
from distserve_rt.sampling_params import SamplingParams
from tests.engine.disagg_helpers import engine_config
from tests.entrypoints.conftest import make_client

pytestmark = pytest.mark.anyio

MODEL = {"model_name": "tiny-served", "engine": "0"}


def _parse(text: str) -> tuple[dict, dict]:
    """(samples {(name, labels): value}, families {name: type})."""
    samples, types = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def _key(name: str, **extra) -> tuple:
    return (name, tuple(sorted((MODEL | extra).items())))


def _buckets(samples: dict, name: str) -> list[float]:
    return sorted(
        float(dict(labels)["le"]) for n, labels in samples if n == f"{name}_bucket"
    )  # fmt: skip


async def _scrape_when_idle(
    client, expected_queries: int, timeout_s: float = 10.0
) -> tuple[dict, dict]:
    """Disaggregated instances report their queues and counters every stats interval, each
    instance on its own: the gauges reach 0 and the prefill instance's cumulative counters
    arrive a report after the last request ends, in either order."""
    deadline = anyio.current_time() + timeout_s
    while True:
        samples, types = _parse((await client.get("/metrics")).text)
        idle = samples[_key("vllm:num_requests_running")] == 0
        reported = samples[_key("vllm:prefix_cache_queries_total")] == expected_queries
        if (idle and reported) or anyio.current_time() > deadline:
            return samples, types
        await anyio.sleep(0.01)


async def _first_token(llm: AsyncLLM, prompt_ids: list[int]) -> int:
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    async for out in llm.generate({"prompt_token_ids": prompt_ids}, params, "reference"):
        final = out
    return final.outputs[0].token_ids[0]


@pytest.mark.parametrize("placement", ["colocated", "disaggregated"])
async def test_vllm_names_labels_and_counts_on_a_live_server(placement):
    llm = AsyncLLM.from_config(
        engine_config(), placement, DisaggConfig(launcher="thread"), model_name="tiny"
    )
    try:
        async with make_client(build_app(llm, served_model_name="tiny-served")) as client:
            prompt_ids = llm.tokenizer.encode("Hello, world!!")  # 15 tokens: 1 full block
            bodies = [
                {"prompt": prompt_ids, "max_tokens": 5, "ignore_eos": True},
                {"prompt": prompt_ids, "max_tokens": 3, "ignore_eos": True, "stream": True},
            ]
            for body in bodies:
                r = await client.post("/v1/completions", json=body | {"temperature": 0})
                assert r.status_code == 200, r.text
            r = await client.post("/v1/completions", json=bodies[0] | {"temperature": 0})
            assert r.status_code == 200, r.text
            # The greedy first token as a stop token (found on the engine, not the server,
            # so it is not counted): "stop" after 1 token.
            first = await _first_token(llm, prompt_ids)
            body = bodies[0] | {"stop_token_ids": [first], "max_tokens": 6, "temperature": 0}
            r = await client.post("/v1/completions", json=body)
            assert r.json()["choices"][0]["finish_reason"] == "stop", r.text
            num_generated = 5 + 3 + 5 + 1
            samples, types = await _scrape_when_idle(client, 5 * len(prompt_ids))
    finally:
        llm.shutdown()
    n = len(prompt_ids)
    assert samples[_key("vllm:prompt_tokens_total")] == 4 * n
    assert samples[_key("vllm:generation_tokens_total")] == num_generated
    assert samples[_key("vllm:request_success_total", finished_reason="length")] == 3
    assert samples[_key("vllm:request_success_total", finished_reason="stop")] == 1
    assert samples[_key("vllm:request_success_total", finished_reason="abort")] == 0
    # The same prompt 5 times (the reference too): the 2nd..5th find its full block cached.
    assert samples[_key("vllm:prefix_cache_queries_total")] == 5 * n
    assert samples[_key("vllm:prefix_cache_hits_total")] == 4 * 8
    for name in (
        "vllm:time_to_first_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
    ):
        assert types[name] == "histogram" and samples[_key(f"{name}_count")] == 4, name
        assert samples[_key(f"{name}_bucket", le="+Inf")] == 4, name
    gaps = (5 - 1) + (3 - 1) + (5 - 1)  # the stopped request's only token has no gap
    for name in ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"):
        assert samples[_key(f"{name}_count")] == gaps, name
    assert samples[_key("vllm:request_time_per_output_token_seconds_count")] == 3
    assert _buckets(samples, "vllm:time_to_first_token_seconds")[:-1] == list(
        vllm_names.TTFT_BUCKETS_S
    )
    assert _buckets(samples, "vllm:inter_token_latency_seconds")[:-1] == list(
        vllm_names.TOKEN_GAP_BUCKETS_S
    )
    assert _buckets(samples, "vllm:e2e_request_latency_seconds")[:-1] == list(
        vllm_names.REQUEST_LATENCY_BUCKETS_S
    )
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
    ):
        assert types[name] == "gauge" and samples[_key(name)] == 0, name  # all finished
    # Ours stay beside them, with their own names.
    assert samples[("distserve_generation_tokens_total", ())] == num_generated
    assert samples[("distserve_time_to_first_token_seconds_count", ())] == 4


def test_vllm_buckets_are_vllms():
    # vLLM v1 (vllm/v1/metrics/loggers.py): TTFT up to 2560 s, ITL 10 ms..80 s, request
    # latencies 0.3 s..7680 s.
    assert vllm_names.TTFT_BUCKETS_S[:3] == (0.001, 0.005, 0.01)
    assert vllm_names.TTFT_BUCKETS_S[-3:] == (160.0, 640.0, 2560.0)
    assert len(vllm_names.TTFT_BUCKETS_S) == 22
    assert vllm_names.TOKEN_GAP_BUCKETS_S[0] == 0.01 and len(vllm_names.TOKEN_GAP_BUCKETS_S) == 19
    assert vllm_names.REQUEST_LATENCY_BUCKETS_S[-1] == 7680.0
    assert len(vllm_names.REQUEST_LATENCY_BUCKETS_S) == 21


def test_disaggregated_gauges_count_each_request_once_and_report_the_fullest_pool():
    stats = EngineStats(
        [
            InstanceStats("prefill-0", "prefill", 2, 4, 0.10),
            InstanceStats("prefill-1", "prefill", 1, 0, 0.05),
            InstanceStats("decode-0", "decode", 7, 1, 0.80),
            InstanceStats("decode-1", "decode", 9, 9, 0.99, alive=False),  # dead: not counted
        ]
    )
    stats.instances[0].prefix_cache_queries, stats.instances[0].prefix_cache_hits = 100, 40
    stats.instances[1].prefix_cache_queries, stats.instances[1].prefix_cache_hits = 50, 10
    got = {
        f.name: (f.samples[0].labels, f.samples[0].value)
        for f in vllm_names.engine_gauges(stats, "m")
    }
    labels = {"model_name": "m", "engine": "0"}
    assert got == {
        "vllm:num_requests_running": (labels, 10),
        "vllm:num_requests_waiting": (labels, 5),
        "vllm:kv_cache_usage_perc": (labels, 0.80),
        "vllm:gpu_cache_usage_perc": (labels, 0.80),
        "vllm:prefix_cache_queries": (labels, 150),
        "vllm:prefix_cache_hits": (labels, 50),
    }


def test_request_success_counts_stop_length_abort_but_not_errors():
    from distserve_rt.metrics.prometheus import PrometheusMetrics

    metrics = PrometheusMetrics(model_name="m")
    for reason in ("abort", "abort", "length", "error"):
        tracker = metrics.track()
        tracker.observe(1)
        tracker.finish(reason, num_prompt_tokens=2)
    value = metrics.registry.get_sample_value
    labels = {"model_name": "m", "engine": "0"}
    for reason, count in (("abort", 2), ("length", 1), ("stop", 0)):
        got = value("vllm:request_success_total", labels | {"finished_reason": reason})
        assert got == count, reason
    assert value("vllm:request_success_total", labels | {"finished_reason": "error"}) is None
    assert value("vllm:prompt_tokens_total", labels) == 8  # every finished request's prompt
