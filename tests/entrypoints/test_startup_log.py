"""The start-up log of `drt-run serve` (vLLM's "non-default args: {...}"): non-default
arguments with the API key masked, the model's shape, max_model_len, the routes; once."""

from __future__ import annotations

import logging

import pytest

# The HTTP server's dependencies: absent on the GPU machine, where these tests skip.
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from distserve_rt.entrypoints import serve, startup_log
from distserve_rt.entrypoints.cli import build_parser
from distserve_rt.models.config import ModelConfig
from tests.entrypoints.fake_engine import FakeEngine


@pytest.fixture
def caplog_drt(caplog):
    # Our package logger does not propagate to the root (it has its own handler).
    logger = logging.getLogger("distserve_rt")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="distserve_rt")
    yield caplog
    logger.removeHandler(caplog.handler)


def test_build_server_logs_args_model_length_and_routes_once(caplog_drt):
    engine = FakeEngine(max_model_len=96)
    engine.model_config = ModelConfig(
        "llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256, name="tiny",
    )  # fmt: skip
    argv = ["serve", "--port", "8123", "--api-key", "s3cret", "--served-model-name", "m"]
    serve.build_server(engine, build_parser().parse_args(argv))
    lines = [
        r.getMessage() for r in caplog_drt.records if r.name == "distserve_rt.entrypoints.serve"
    ]
    (args_line,) = [line for line in lines if line.startswith("non-default args: ")]
    assert args_line == (
        "non-default args: {'port': 8123, 'api_key': '***', 'served_model_name': 'm'}"
    )
    assert "s3cret" not in "\n".join(lines)
    assert (
        "model tiny: llama, 2 layers, hidden 64, 4 heads (2 KV) x 16, FFN 128, vocab 512, "
        "max positions 256"
    ) in lines
    assert "served model name 'm', max_model_len 96" in lines
    (routes,) = [line for line in lines if line.startswith("routes: ")]
    for route in ("POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models",
                  "POST /tokenize", "POST /detokenize", "GET /version", "GET /health",
                  "GET /metrics", "GET /docs", "GET /openapi.json"):  # fmt: skip
        assert route in routes, route


def test_defaults_log_an_empty_dict_and_no_model_line_without_a_config(caplog_drt):
    serve.build_server(FakeEngine(), build_parser().parse_args(["serve"]))
    lines = [r.getMessage() for r in caplog_drt.records]
    assert "non-default args: {}" in lines
    assert not any(line.startswith("model ") for line in lines)


def test_non_default_args_compares_with_the_parsers_defaults():
    parser = serve.serve_parser()
    args = build_parser().parse_args(["serve", "--max-concurrent-requests", "4"])
    assert startup_log.non_default_args(args, parser) == {"max_concurrent_requests": 4}


def test_a_parsed_placement_is_logged_as_its_description():
    parser = serve.serve_parser()
    args = build_parser().parse_args(["serve", "--placement", "disaggregated"])
    assert startup_log.non_default_args(args, parser)["placement"] == (
        "1 prefill x (tp=1, pp=1) + 1 decode x (tp=1, pp=1)"
    )
