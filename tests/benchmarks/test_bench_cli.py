"""`drt-run bench` end to end: over HTTP against a tiny OpenAI-style server (uvicorn in a
thread), and in process with the fake engine standing in for build_engine_client."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

# The tiny HTTP target runs on uvicorn + starlette: absent on the GPU machine, where this
# module skips (the in-process cases need neither, but share the module).
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from distserve_rt.entrypoints import engine_args
from distserve_rt.entrypoints.cli import main
from tests.benchmarks.fake_engine import FakeEngine


async def completions(request: Request):
    body = await request.json()

    async def events():
        for i in range(body["max_tokens"]):
            await asyncio.sleep(0.002)
            finish = "length" if i == body["max_tokens"] - 1 else None
            choice = {"index": 0, "text": "x", "finish_reason": finish}
            yield f"data: {json.dumps({'choices': [choice]})}\n\n"
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def chat_completions(request: Request):
    body = await request.json()
    prompt = body["messages"][0]["content"]

    async def events():
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        yield f"data: {json.dumps({'choices': [role]})}\n\n"
        n = body["max_completion_tokens"]
        for _ in range(n):
            await asyncio.sleep(0.002)
            choice = {"index": 0, "delta": {"content": "y"}, "finish_reason": None}
            yield f"data: {json.dumps({'choices': [choice]})}\n\n"
        usage = {"prompt_tokens": len(prompt) + 3, "completion_tokens": n}
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def models(request: Request):
    return JSONResponse({"data": [{"id": "tiny", "max_model_len": 64}]})


@pytest.fixture(scope="module")
def server_url():
    app = Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/health", lambda request: JSONResponse({})),
            Route("/v1/models", models),
        ]
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=5)


COMMON = [
    "--dataset-name", "random", "--num-prompts", "6", "--random-input-len", "8",
    "--random-output-len", "4", "--disable-tqdm", "--slo-ttft-ms", "500", "--slo-tpot-ms", "500",
]  # fmt: skip


def test_http_sweep_saves_vllm_json_sweep_and_plot(server_url, tmp_path, capsys):
    argv = ["bench", "--base-url", server_url, "--tokenizer", "dummy:llama-tiny", *COMMON]
    argv += ["--request-rate", "100", "inf", "--save-result", "--result-dir", str(tmp_path)]
    argv += ["--label", "colocated", "--goodput-search", "--goodput-max-rate", "400"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("============ Serving Benchmark Result ============") == 2
    assert "per device: 400.000 req/s over 1 device(s)" in out
    runs = sorted(tmp_path.glob("colocated-*qps-tiny-*.json"))
    assert len(runs) == 2
    data = json.loads(runs[0].read_text())
    assert data["model_id"] == "tiny" and data["backend"] == "openai"
    assert data["completed"] == 6 and data["output_lens"] == [4] * 6
    assert data["provenance"]["git_commit"]
    sweep = json.loads((tmp_path / "colocated-sweep-tiny.json").read_text())
    assert sweep["goodput_search"]["per_device_goodput"] == 400.0
    assert (tmp_path / "colocated-sweep-tiny.png").stat().st_size > 1000
    assert main(["bench-plot", str(tmp_path / "colocated-sweep-tiny.json"), str(runs[0]), "-o",
                 str(tmp_path / "both.png")]) == 0  # fmt: skip
    assert (tmp_path / "both.png").exists()


def test_http_chat_with_sharegpt_goodput_and_percentiles(server_url, tmp_path, capsys):
    """vllm bench serve's flags end to end: the chat client, a ShareGPT file's prompts, the
    ready check, --goodput and the percentile keys in the saved JSON."""
    turn = lambda who, n: {"from": who, "value": "ab " * n}  # noqa: E731 - 3n bytes
    data = [{"conversations": [turn("human", k), turn("gpt", 2)]} for k in (2, 3, 4)]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    argv = ["bench", "--base-url", server_url, "--backend", "openai-chat"]
    argv += ["--tokenizer", "dummy:llama-tiny", "--dataset-path", str(path)]
    argv += ["--num-prompts", "4", "--request-rate", "200", "--disable-tqdm", "--num-warmups", "0"]
    argv += ["--goodput", "ttft:10000", "e2el:0.001", "--ready-check-timeout-sec", "5"]
    argv += ["--percentile-metrics", "ttft,e2el", "--metric-percentiles", "50,99.5"]
    argv += ["--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "P99.5 TTFT (ms):" in out and "Mean TPOT" not in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["backend"] == "openai-chat" and result["completed"] == 4
    assert result["request_goodput"] == 0.0  # nobody finishes within 1 us
    assert result["goodput"] == {"ttft": 10000.0, "e2el": 0.001}
    assert {"p50_ttft_ms", "p99.5_ttft_ms", "p99.5_e2el_ms"} <= result.keys()
    assert "p99_tpot_ms" not in result and "mean_itl_ms" not in result
    # Byte tokens: BOS + 3k bytes (+3 for the server's template, from the usage chunk).
    assert sorted(set(result["input_lens"])) <= [7 + 3, 10 + 3, 13 + 3]
    assert result["output_lens"] == [7, 7, 7, 7]  # "ab ab " is 6 bytes + BOS


def test_in_process_uses_build_engine_client(monkeypatch, capsys):
    engine = FakeEngine(max_model_len=10)
    monkeypatch.setattr(engine_args, "build_engine_client", lambda args, **_: engine)
    argv = ["bench", *COMMON, "--request-rate", "200", "--slo-scale", "--num-warmups", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Successful requests:                     6" in out
    assert "6 requests clipped to max_model_len" in out  # 8 + 4 > 10
    assert "slo scale" in out
    assert all(len(ids) == 6 and p.max_tokens == 4 for _, ids, p in engine.received)


def test_bad_flags_are_rejected():
    with pytest.raises(SystemExit, match="--num-prompts must be >= 1"):
        main(["bench", "--num-prompts", "0", "--base-url", "http://127.0.0.1:1"])
    with pytest.raises(SystemExit):
        main(["bench", "--request-rate", "0"])
