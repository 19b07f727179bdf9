"""`drt-run bench`'s vllm bench serve flags: --goodput parsing and counting, the percentile
keys, --backend/--endpoint (the chat client), --dataset-path (ShareGPT, length files), the
ready check on a driven clock, and one-line CLI errors (subprocess, exit 1)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from distserve_rt.benchmarks.serving.http_backend import (
    OpenAIChatHTTPBackend,
    http_ready_probe,
    wait_until_ready,
)
from distserve_rt.benchmarks.serving.metrics import compute_metrics
from distserve_rt.benchmarks.serving.record import RequestRecord
from distserve_rt.benchmarks.serving.report import RunInfo, format_table, result_json
from distserve_rt.benchmarks.serving.request_set import BenchRequest
from distserve_rt.benchmarks.serving.runner import RunOutput
from distserve_rt.benchmarks.serving.vllm_flags import (
    count_good,
    parse_goodput,
    parse_metric_percentiles,
    parse_percentile_metrics,
    resolve_endpoint,
)
from distserve_rt.metrics.slo import SLO
from distserve_rt.workloads.sharegpt import load_sharegpt

REPO = Path(__file__).resolve().parents[2]


# --- --goodput -------------------------------------------------------------------------


def test_goodput_parses_pairs_like_vllm():
    assert parse_goodput(["ttft:500", "tpot:50.5", "e2el:0"]) == {
        "ttft": 500.0,
        "tpot": 50.5,
        "e2el": 0.0,
    }
    assert parse_goodput(None) == {}


@pytest.mark.parametrize(
    "pairs, message",
    [
        (["ttft=500"], "Invalid format found for service level objectives"),
        (["ttft:abc"], "Invalid format found"),
        (["ttft:1:2"], "Invalid format found"),
        (["itl:5"], r"Invalid metric name found, itl: 5.0.*\['ttft', 'tpot', 'e2el'\]"),
        (["tpot:-1"], "Invalid value found, tpot: -1.0.*non-negative"),
    ],
)
def test_goodput_rejects_like_vllm(pairs, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_goodput(pairs)
    assert str(err.value).startswith("--goodput") and "\n" not in str(err.value)


def _record(ttft, e2e, out, ok=True):
    r = RequestRecord("r", 10, out, success=ok, output_len=out, ttft=ttft, e2e=e2e)
    r.itl = [(e2e - ttft) / max(1, out - 1)] * max(0, out - 1)
    return r


def test_goodput_counts_successful_requests_meeting_every_objective():
    records = [
        _record(0.10, 1.0, 10),  # tpot 0.1: good on ttft:200 tpot:150, bad on e2el:900
        _record(0.30, 1.2, 10),  # ttft too slow
        _record(0.05, 0.05, 1),  # one token: tpot counts as 0
        _record(0.0, 0.0, 0, ok=False),  # failed: never good
    ]
    m = compute_metrics(records, 2.0, SLO(10, 10), goodput_ms={"ttft": 200, "tpot": 150})
    assert m.request_goodput == pytest.approx(2 / 2.0)
    m = compute_metrics(records, 2.0, SLO(10, 10), goodput_ms={"ttft": 200, "e2el": 900})
    assert m.request_goodput == pytest.approx(1 / 2.0)
    # Without --goodput: the share meeting both --slo-* SLOs (3 of 4 at 10 s each).
    m = compute_metrics(records, 2.0, SLO(10, 10))
    assert m.request_goodput == pytest.approx(3 / 2.0)
    assert count_good([0.1, 0.2], [0.0, 0.0], [1, 1], {"ttft": 100}) == 1  # <= is good


# --- percentile keys -------------------------------------------------------------------


def test_percentile_flags_choose_the_keys_and_rows():
    records = [_record(0.01 * i, 0.5 + 0.01 * i, 8) for i in range(1, 21)]
    pct = parse_metric_percentiles("25,99.9")
    m = compute_metrics(records, 1.0, SLO(1, 1), percentiles=pct, goodput_ms={"ttft": 100})
    info = RunInfo(
        "openai", "m", "t", "l", 1.0, 1.0, None, 0,
        percentile_metrics=parse_percentile_metrics("ttft,e2el"), metric_percentiles=pct,
    )  # fmt: skip
    run = RunOutput(records, 1.0, 0.0)
    out = result_json(info, run, m)
    assert out["p25_ttft_ms"] == pytest.approx(1000 * (0.01 + 0.19 * 0.25))  # numpy linear
    assert "p99.9_e2el_ms" in out and "mean_e2el_ms" in out
    assert not [k for k in out if k.endswith(("_tpot_ms", "_itl_ms"))]
    assert "p50_ttft_ms" not in out and "p99_ttft_ms" not in out
    assert out["request_goodput"] == pytest.approx(10.0) and out["goodput"] == {"ttft": 100}
    table = format_table(info, m)
    assert "P25 TTFT (ms):" in table and "P99.9 E2EL (ms):" in table
    assert "Mean TPOT" not in table and "Mean ITL" not in table
    # Defaults: every metric, p50/p90/p99 (the keys drt-run bench always wrote).
    out = result_json(RunInfo("openai", "m", "t", "l", 1.0, 1.0, None, 0), run, m)
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert {f"p50_{name}_ms", f"p90_{name}_ms", f"p99_{name}_ms"} <= out.keys()


@pytest.mark.parametrize(
    "call, text, message",
    [
        (parse_percentile_metrics, "ttft,foo", "unknown metric 'foo'"),
        (parse_metric_percentiles, "50,abc", "'abc' is not a percentile"),
        (parse_metric_percentiles, "101", "'101' is not a percentile"),
    ],
)
def test_percentile_flags_reject_bad_values(call, text, message):
    with pytest.raises(ValueError, match=message):
        call(text)


# --- --backend / --endpoint and the chat client ----------------------------------------


def test_backend_and_endpoint_resolve_like_vllm():
    assert resolve_endpoint("openai", None) == ("completions", "/v1/completions")
    assert resolve_endpoint("vllm", None) == ("completions", "/v1/completions")
    assert resolve_endpoint("openai-chat", None) == ("chat", "/v1/chat/completions")
    with pytest.raises(ValueError, match="must end with 'chat/completions'"):
        resolve_endpoint("openai-chat", "/v1/completions")
    with pytest.raises(ValueError, match="must end with 'completions'"):
        resolve_endpoint("openai", "/v1/chat/completions")
    with pytest.raises(ValueError, match="--backend 'tgi' is not supported; allowed: openai"):
        resolve_endpoint("tgi", None)


def _chat_chunk(delta, finish=None, usage=None):
    body = {"object": "chat.completion.chunk", "choices": []}
    if delta is not None:
        body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n".encode()


def test_chat_client_streams_and_times_tokens_not_the_role_chunk():
    events = [
        _chat_chunk({"role": "assistant", "content": ""}),
        _chat_chunk({"content": "a"}),
        _chat_chunk({"content": ""}),  # a token whose character is not complete yet
        _chat_chunk({"content": "b"}, finish="length"),
        _chat_chunk(None, usage={"prompt_tokens": 9, "completion_tokens": 3}),
        b"data: [DONE]\n\n",
    ]
    seen: list[httpx.Request] = []

    def handler(request):
        seen.append(request)
        return httpx.Response(200, content=b"".join(events))

    async def go():
        backend = OpenAIChatHTTPBackend(
            "http://t", model="m", transport=httpx.MockTransport(handler),
            decode=lambda ids: "ids " + " ".join(map(str, ids)), name="openai-chat",
        )  # fmt: skip
        record = RequestRecord("q", 3, 3, start_time=time.perf_counter())
        await backend.send(BenchRequest("q", [5, 6, 7], 3, 0.0), record)
        await backend.close()
        return record

    record = asyncio.run(go())
    assert seen[0].url.path == "/v1/chat/completions"
    body = json.loads(seen[0].content)
    assert body["messages"] == [{"role": "user", "content": "ids 5 6 7"}]
    assert body["max_completion_tokens"] == 3 and body["stream"] and body["ignore_eos"]
    assert record.success and record.generated_text == "ab"
    assert len(record.itl) == 2  # 3 token chunks: TTFT + 2 gaps; the role chunk is none
    assert record.output_len == 3 and record.prompt_len == 9  # the chat template's tokens


# --- --dataset-path --------------------------------------------------------------------


def _encode(text: str) -> list[int]:
    return [1, *range(2, 2 + len(text.split()))]  # BOS + one id per word


def test_sharegpt_sampling_filters_like_vllm(tmp_path):
    def conv(*turns: int) -> dict:  # turn lengths in words -> words + 1 ids with BOS
        names = ["human", "gpt"]
        return {"conversations": [{"from": names[i % 2], "value": " ".join(["w"] * n)}
                                  for i, n in enumerate(turns)]}  # fmt: skip

    data = [
        conv(10, 20),  # valid
        conv(1, 20),  # prompt under 4 tokens (2 with BOS)
        conv(10, 2),  # output under 4
        conv(1500, 9),  # prompt over 1024
        conv(1000, 1100),  # prompt + output over 2048
        conv(10),  # one turn
        {"id": "no conversations"},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    workload, prompts = load_sharegpt(path, _encode, 3, seed=0)
    # Only the first entry survives (prompt 11 ids, output 21 ids); oversampled to 3.
    assert workload.prompt_lens.tolist() == [11, 11, 11]
    assert workload.output_lens.tolist() == [21, 21, 21]
    assert prompts[0] == _encode(" ".join(["w"] * 10))
    with pytest.raises(ValueError, match="no conversation is usable"):
        load_sharegpt(path, lambda t: [1], 3)
    path.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="JSON list"):
        load_sharegpt(path, _encode, 3)


# --- ready check (driven clock) --------------------------------------------------------


def test_ready_check_waits_then_gives_up_on_a_driven_clock():
    now = [0.0]
    answers = iter(["refused", "HTTP 503", None])

    async def probe():
        return next(answers)

    async def sleep(s):
        now[0] += s

    asyncio.run(wait_until_ready(probe, 10, what="x", clock=lambda: now[0], sleep=sleep))
    assert now[0] == 2.0  # two 1 s waits, then ready

    async def never():
        return "ConnectError: refused"

    now[0] = 0.0
    with pytest.raises(ValueError) as err:
        asyncio.run(
            wait_until_ready(never, 5, what="the server", clock=lambda: now[0], sleep=sleep)
        )
    assert str(err.value) == (
        "--ready-check-timeout-sec 5: the server was not ready within 5 s "
        "(last: ConnectError: refused)"
    )
    assert now[0] == 5.0


def test_ready_probe_tries_health_then_models():
    def handler(request):
        return httpx.Response(404 if request.url.path == "/health" else 200, json={})

    probe = http_ready_probe("http://t", transport=httpx.MockTransport(handler))
    assert asyncio.run(probe()) is None

    down = http_ready_probe(
        "http://t", transport=httpx.MockTransport(lambda r: httpx.Response(503))
    )
    assert asyncio.run(down()) == "GET /v1/models: HTTP 503"


# --- CLI: one line, exit 1 -------------------------------------------------------------


def _bench(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("DRT_LOG_LEVEL", None)
    cmd = [sys.executable, "-m", "distserve_rt.entrypoints.cli", "bench", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=REPO)


BAD_VALUES = [
    (["--backend", "tgi"], "drt-run bench: --backend 'tgi' is not supported; allowed: "),
    (["--goodput", "itl:5"], "drt-run bench: --goodput: Invalid metric name found, itl"),
    (["--goodput", "ttft"], "drt-run bench: --goodput 'ttft': Invalid format found"),
    (["--percentile-metrics", "ttft,x"], "drt-run bench: --percentile-metrics 'ttft,x'"),
    (["--metric-percentiles", "p99"], "drt-run bench: --metric-percentiles 'p99'"),
    (["--burstiness", "0"], "drt-run bench: --burstiness '0' must be a finite number > 0"),
    (["--max-concurrency", "x"], "drt-run bench: --max-concurrency 'x' is not a number"),
    (
        ["--backend", "openai-chat", "--endpoint", "/v1/completions"],
        "drt-run bench: --endpoint '/v1/completions' does not fit --backend openai-chat",
    ),
    (["--port", "70000"], "drt-run bench: --port '70000' must be in 1..65535"),
    (["--ready-check-timeout-sec", "-1"], "drt-run bench: --ready-check-timeout-sec '-1'"),
    (["--dataset-path", "/nonexistent/sg.json"], "drt-run bench: --dataset-path '/nonexist"),
]


@pytest.mark.parametrize("argv, message", BAD_VALUES)
def test_cli_bad_values_are_one_line_and_exit_1(argv, message):
    from distserve_rt.entrypoints.cli import main

    # bench ends a user error with SystemExit(line): Python prints it and exits 1.
    with pytest.raises(SystemExit) as err:
        main(["bench", *argv])
    line = err.value.code
    assert isinstance(line, str) and "\n" not in line and line.startswith(message), line


def test_cli_errors_in_a_subprocess():
    """The same path as a user's shell: one stderr line, exit 1, no traceback (a server
    that is not there fails the ready check at once: nothing listens on port 1)."""
    cases = [
        (BAD_VALUES[0][0], BAD_VALUES[0][1]),
        (
            ["--port", "1", "--ready-check-timeout-sec", "0.3", "--model", "m"],
            "drt-run bench: --ready-check-timeout-sec 0.3: the server at http://127.0.0.1:1 "
            "was not ready within 0.3 s (last: ConnectError",
        ),
    ]
    for argv, message in cases:
        proc = _bench(*argv)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1, (argv, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith(message), (argv, proc.stderr)


def test_chat_prompt_text_reads_back_within_the_requested_length():
    from distserve_rt.benchmarks.serving.request_set import prompt_text
    from distserve_rt.tokenizer import get_tokenizer

    tok = get_tokenizer("dummy:llama-tiny")  # bytes: a lone high byte decodes to U+FFFD
    rng = __import__("random").Random(0)
    for n in (1, 7, 64):
        ids = [rng.randrange(3, 259) for _ in range(n)]
        naive = tok.encode(tok.decode(ids, skip_special_tokens=True), add_special_tokens=False)
        text = prompt_text(ids, tok)
        assert len(tok.encode(text, add_special_tokens=False)) <= n
        if n == 64:
            assert len(naive) > n  # what the chat client sent before
            assert len(tok.encode(text, add_special_tokens=False)) >= n // 2
