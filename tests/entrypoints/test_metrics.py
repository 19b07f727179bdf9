"""/metrics (Prometheus text), /v1/models and /health."""

from __future__ import annotations

import pytest

# The HTTP server's dependencies: absent on the GPU machine, where these tests skip.
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from prometheus_client.parser import text_string_to_metric_families

from distserve_rt.entrypoints.openai import build_app
from distserve_rt.metrics.prometheus import PrometheusMetrics
from tests.entrypoints.conftest import make_client

pytestmark = pytest.mark.anyio


async def scrape(client) -> dict[tuple[str, tuple], float]:
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


async def test_latency_histograms_and_token_counters(client, engine):
    await client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 5})
    body = {"prompt": "Hi", "max_tokens": 3, "stream": True}
    await client.post("/v1/completions", json=body)
    await client.post("/v1/completions", json={"prompt": "FAIL", "max_tokens": 9})
    m = await scrape(client)
    assert m[("distserve_time_to_first_token_seconds_count", ())] == 3
    assert m[("distserve_e2e_request_latency_seconds_count", ())] == 3
    # Per request with >= 2 tokens: 5, 3 and 2 (FAIL stops after 2) tokens.
    assert m[("distserve_time_per_output_token_seconds_count", ())] == 3
    assert m[("distserve_inter_token_latency_seconds_count", ())] == 4 + 2 + 1
    assert m[("distserve_request_queue_time_seconds_count", ())] == 3
    bucket = ("distserve_time_to_first_token_seconds_bucket", (("le", "+Inf"),))
    assert m[bucket] == 3
    assert m[("distserve_requests_total", (("finish_reason", "length"),))] == 2
    assert m[("distserve_requests_total", (("finish_reason", "error"),))] == 1
    assert m[("distserve_prompt_tokens_total", ())] == 6 + 3 + 5
    assert m[("distserve_generation_tokens_total", ())] == 5 + 3 + 2
    assert m[("distserve_http_requests_in_flight", ())] == 0


async def test_engine_stats_are_read_at_scrape_time(client, engine):
    m = await scrape(client)
    labels = (("instance", "decode-0"), ("role", "decode"))
    assert m[("distserve_instance_kv_cache_usage_ratio", labels)] == 0.25
    assert m[("distserve_instance_num_requests_running", labels)] == 0
    assert m[("distserve_instance_alive", labels)] == 1
    prefill = (("instance", "prefill-0"), ("role", "prefill"))
    assert m[("distserve_instance_num_requests_waiting", prefill)] == 0
    await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    m = await scrape(client)
    transport = (("transport", "fake"),)
    assert m[("distserve_kv_transfers_total", transport)] == 1
    assert m[("distserve_kv_transfer_bytes_total", transport)] == 4096
    assert m[("distserve_kv_transfer_failures_total", transport)] == 1
    assert m[("distserve_kv_transfer_seconds_total", transport)] == 0.5


async def test_rejections_are_counted_by_status(client, engine):
    engine.overloaded = True
    await client.post("/v1/completions", json={"prompt": "hi"})
    m = await scrape(client)
    assert m[("distserve_requests_rejected_total", (("status", "503"),))] == 1
    assert ("distserve_time_to_first_token_seconds_count", ()) in m


async def test_two_apps_keep_separate_registries(engine):
    a, b = build_app(engine), build_app(engine)
    async with make_client(a) as ca, make_client(b) as cb:
        await ca.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert (await scrape(ca))[("distserve_requests_total", (("finish_reason", "length"),))]
        assert ("distserve_requests_total", (("finish_reason", "length"),)) not in await scrape(cb)


def test_itl_splits_a_multi_token_gap():
    metrics = PrometheusMetrics()
    tracker = metrics.track()
    tracker.observe(1)
    tracker.observe(4)  # three tokens in one output: three gaps
    tracker.finish("length", num_prompt_tokens=2)
    tracker.finish("length", num_prompt_tokens=2)  # counted once
    samples = {s.name: s.value for s in metrics.itl.collect()[0].samples if not s.labels}
    assert samples["distserve_inter_token_latency_seconds_count"] == 3
    assert metrics.requests.labels(finish_reason="length")._value.get() == 1


async def test_models_and_health(engine):
    async with make_client(build_app(engine, served_model_name="my-llama")) as c:
        r = await c.get("/v1/models")
        assert r.status_code == 200
        body = r.json()
        assert body["object"] == "list"
        (card,) = body["data"]
        assert card["id"] == "my-llama" and card["object"] == "model"
        assert card["root"] == "fake-model" and card["max_model_len"] == 128
        assert (await c.get("/health")).status_code == 200
        r = await c.post("/v1/completions", json={"prompt": "x", "model": "my-llama"})
        assert r.status_code == 200 and r.json()["model"] == "my-llama"
        r = await c.post("/v1/completions", json={"prompt": "x", "model": "fake-model"})
        assert r.status_code == 404


def test_build_app_checks_its_arguments(engine):
    with pytest.raises(TypeError, match="EngineClient"):
        build_app(object())
    with pytest.raises(ValueError, match="max_concurrent must be None or an int >= 1, got 0"):
        build_app(engine, max_concurrent=0)
    with pytest.raises(ValueError, match="api_key"):
        build_app(engine, api_key="")
