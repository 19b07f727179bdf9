"""`drt-run serve`: flags, the engine seam, and a real uvicorn server over the fake engine
(bind, stream over TCP, disconnect aborts, graceful stop shuts the engine down)."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

# The HTTP server's dependencies: absent on the GPU machine, where these tests skip.
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from distserve_rt.entrypoints import engine_args, serve
from distserve_rt.entrypoints.cli import build_parser, main
from tests.entrypoints.fake_engine import FakeEngine


def test_defaults_bind_loopback_and_serve_the_tiny_dummy_model():
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8000, None)
    assert args.model is None and args.placement is None
    assert args.max_concurrent_requests is None
    config, placement, _ = engine_args.configs_from_args(args)
    assert config.model == "dummy:llama-tiny" and config.policy == "chunked_prefill"
    assert not placement.is_disaggregated


def test_help_lists_server_and_engine_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--api-key", "--served-model-name", "--max-concurrent-requests", "--placement",
                 "--tensor-parallel-size", "--policy"):  # fmt: skip
        assert flag in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "70000"], "must be a port in [0, 65535], got 70000"),
        (["--max-concurrent-requests", "0"], "must be an int >= 1, got 0"),
        (["--policy", "fifo"], "invalid choice: 'fifo'"),
    ],
)
def test_bad_flags_are_refused(capsys, argv, message):
    with pytest.raises(SystemExit):
        main(["serve", *argv])
    assert message in capsys.readouterr().err


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("DRT_API_KEY", "from-env")
    args = build_parser().parse_args(["serve"])
    assert serve.resolve_api_key(args) == "from-env"
    args = build_parser().parse_args(["serve", "--api-key", "flag"])
    assert serve.resolve_api_key(args) == "flag"


def test_bad_placement_file_is_named(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["serve", "--placement", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err
    assert "argument --placement" in err and "cannot read placement file" in err
    assert "nope.yaml" in err


def test_build_engine_client_builds_async_llm():
    args = build_parser().parse_args(["serve", "--kv-cache-memory-bytes", "8MiB"])
    engine = engine_args.build_engine_client(args)
    try:
        assert engine.max_model_len > 0 and engine.model_name == "dummy:llama-tiny"
    finally:
        engine.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_server_streams_aborts_on_disconnect_and_shuts_the_engine_down():
    engine = FakeEngine(token_delay_s=0.01)
    port = free_port()
    args = build_parser().parse_args(["serve", "--port", str(port), "--log-level", "warning"])
    server = serve.build_server(engine, args)
    result = {}
    thread = threading.Thread(target=lambda: result.update(rc=serve.run_server(server, engine)))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.started
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=5) as client:
            assert client.get("/health").status_code == 200
            body = {"prompt": "hi", "max_tokens": 3, "stream": True}
            r = client.post("/v1/completions", json=body)
            assert r.text.endswith("data: [DONE]\n\n") and r.text.count("data: ") == 4
            body["max_tokens"] = 100
            with client.stream("POST", "/v1/completions", json=body) as stream:
                first = next(stream.iter_lines())
                assert first.startswith("data: ")
            # Closing the response closed the connection: the engine request is aborted.
            deadline = time.monotonic() + 5
            while not engine.aborted and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(engine.aborted) == 1 and not engine.running
    finally:
        server.should_exit = True
        thread.join(timeout=15)
    assert not thread.is_alive()
    assert result["rc"] == 0 and engine.shutdown_called
