"""The flags of `drt-run bench` (names follow ``vllm bench serve`` where one exists)."""

from __future__ import annotations

import argparse

from distserve_rt.benchmarks.serving.compare import CompareEntry
from distserve_rt.entrypoints import engine_args
from distserve_rt.workloads import DATASET_ALIASES, DATASETS, SLO_PRESETS


def _rate(text: str) -> float:
    value = float(text)  # accepts "inf"
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a rate must be > 0 req/s or inf, got {text!r}")
    return value


def _compare_entry(text: str) -> CompareEntry:
    try:
        return CompareEntry.parse(text)
    except (ValueError, OSError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _length_scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a factor > 0, got {text!r}")
    return value


def add_target_args(p: argparse.ArgumentParser) -> None:
    # The in-process engine's flags first: the target group's --model and --max-model-len
    # below replace theirs (the parser resolves conflicts) with help that covers HTTP too.
    engine_args.add_engine_args(p)
    g = p.add_argument_group("target (an HTTP server with --base-url, else an in-process engine)")
    g.add_argument(
        "--base-url",
        help="OpenAI-compatible server, e.g. http://127.0.0.1:8000; without it the engine "
        "runs in this process (its flags are drt-run serve's)",
    )
    g.add_argument(
        "--backend",
        help="HTTP client, as vllm bench serve's: openai (or its alias vllm) streams "
        "/v1/completions, openai-chat streams /v1/chat/completions; giving it (or --host/"
        "--port) targets http://HOST:PORT when --base-url is not given",
    )
    g.add_argument(
        "--endpoint",
        help="API path (default: /v1/completions, /v1/chat/completions for openai-chat)",
    )
    g.add_argument("--host", help="server host when no --base-url (default: 127.0.0.1)")
    g.add_argument("--port", help="server port when no --base-url (default: 8000)")
    g.add_argument(
        "--ready-check-timeout-sec",
        default="0",
        help="HTTP: wait up to this long for the server's /health (else /v1/models) to answer "
        "200 before starting; 0 skips the check, as vllm bench serve's default (default: 0)",
    )
    g.add_argument("--api-key", help="bearer token for the server (default: none)")
    g.add_argument(
        "--model",
        help="HTTP: model name sent to the server (default: the first of /v1/models); "
        "in-process: the model to load (an HF directory or dummy:<preset>)",
    )
    g.add_argument(
        "--tokenizer",
        help="HTTP: tokenizer whose vocabulary prompt ids are drawn from: an HF directory or "
        "dummy:<preset> (default: --model)",
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        help="context length requests are clipped to; HTTP default: max_model_len from "
        "/v1/models; in-process: the engine's context length (default: the model's)",
    )
    g.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (default: 0)"
    )
    g.add_argument(
        "--compare",
        nargs="+",
        type=_compare_entry,
        metavar="PLACEMENT[:POLICY]",
        help="in-process: run the same requests on each setup in turn (colocated, "
        "disaggregated, a placement YAML; colocated:chunked_prefill picks the policy) and "
        "print them side by side; the engine flags apply to every setup",
    )


def add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    names = sorted({*DATASETS, *DATASET_ALIASES, "random"})
    g.add_argument(
        "--dataset-name",
        choices=names,
        help="request lengths: a paper dataset (shipped with the package) or random "
        "(default: the --slo-preset's dataset, else sharegpt)",
    )
    g.add_argument(
        "--dataset-path",
        help="a file of requests: a ShareGPT-format JSON list (conversations; turn 0 is the "
        "prompt, turn 1's token count the output length, filtered and sampled as vllm bench "
        "serve does) or a length file (JSONL/CSV with prompt_len/output_len columns)",
    )
    g.add_argument("--num-prompts", type=int, default=100, help="requests per run (default: 100)")
    g.add_argument("--random-input-len", type=int, default=128, help="random: prompt tokens")
    g.add_argument("--random-output-len", type=int, default=32, help="random: output tokens")
    g.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="random: lengths uniform in [len*(1-r), len*(1+r)] (default: 0, fixed)",
    )
    g.add_argument(
        "--length-scale",
        type=_length_scale,
        default=1.0,
        metavar="FACTOR",
        help="multiply every prompt and output length by FACTOR (rounded, >= 1 token), e.g. "
        "to fit a paper dataset to a tiny model on CPU (default: 1)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="lengths, prompt ids and arrivals seed (in-process: also the engine's)",
    )


def add_load_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("load")
    g.add_argument(
        "--request-rate",
        type=_rate,
        nargs="+",
        default=[float("inf")],
        help="one or more rates, req/s; inf sends every request at once (default: inf)",
    )
    g.add_argument(
        "--burstiness",
        default="1.0",  # checked in bench_serving: a bad value is one line, not a usage dump
        help="1 = Poisson arrivals; else gamma gaps with this shape (<1 burstier)",
    )
    g.add_argument("--max-concurrency", help="requests in flight at most (default: any)")
    g.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds before a request counts as failed (default: 600)",
    )
    g.add_argument(
        "--num-warmups",
        type=int,
        default=1,
        help="requests sent at once (8 output tokens at most) and discarded before the runs "
        "of each target, so that no run pays a fresh engine's one-time costs (default: 1)",
    )
    g.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def add_slo_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SLOs and goodput")
    g.add_argument(
        "--slo-preset", choices=sorted(SLO_PRESETS), help="the paper's Table 1 SLOs (and dataset)"
    )
    g.add_argument(
        "--goodput",
        nargs="+",
        metavar="KEY:MS",
        help="vllm bench serve's goodput: request_goodput counts the successful requests "
        "meeting every objective given (ttft, tpot, e2el in ms, e.g. ttft:250 tpot:100); "
        "without it request_goodput is the rate meeting both --slo-* SLOs",
    )
    g.add_argument("--slo-ttft-ms", type=float, help="TTFT SLO, ms (default: 250)")
    g.add_argument("--slo-tpot-ms", type=float, help="TPOT SLO, ms (default: 100)")
    g.add_argument(
        "--attainment-target",
        type=float,
        default=0.9,
        help="fraction of requests that must meet both SLOs (default: 0.9)",
    )
    g.add_argument(
        "--goodput-search",
        action="store_true",
        help="find the highest rate meeting the target (bracket + bisection over runs) and "
        "report it per device",
    )
    g.add_argument(
        "--num-devices",
        type=int,
        default=1,
        help="devices the engine uses, for per-device goodput (on CPU: the cores it uses)",
    )
    g.add_argument(
        "--goodput-rel-tol",
        type=float,
        default=0.1,
        help="stop bisecting when the bracket is this close (relative; default: 0.1)",
    )
    g.add_argument("--goodput-min-rate", type=_rate, default=0.05, help="lowest rate tried")
    g.add_argument("--goodput-max-rate", type=_rate, default=1000.0, help="highest rate tried")
    g.add_argument(
        "--slo-scale",
        action="store_true",
        help="print the SLO-scale table: per rate, the tightest factor on both SLOs that the "
        "target fraction met (always saved in the JSON)",
    )


def add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--label", help="run label, one line per label in plots (default: backend)")
    g.add_argument(
        "--save-result",
        action="store_true",
        help="save one vLLM-compatible JSON per rate (and a sweep JSON + PNG for sweeps)",
    )
    g.add_argument("--result-dir", default=".", help="where results go (default: .)")
    g.add_argument("--result-filename", help="file name of a single run's JSON")
    g.add_argument(
        "--plot",
        help="PNG of attainment vs rate (default with --save-result; with --compare always, "
        "by default compare-<model>.png in --result-dir)",
    )
    g.add_argument(
        "--metadata", nargs="*", metavar="KEY=VALUE", default=[], help="extra keys for the JSON"
    )
    g.add_argument(
        "--percentile-metrics",
        help="comma-separated latencies whose statistics are printed and saved, of ttft, tpot, "
        "itl, e2el (default: all four)",
    )
    g.add_argument(
        "--metric-percentiles",
        help="comma-separated percentiles printed and saved as pNN_<metric>_ms, e.g. 50,90,99 "
        "(default: 50,90,99)",
    )


def add_all(p: argparse.ArgumentParser) -> None:
    add_target_args(p)
    add_workload_args(p)
    add_load_args(p)
    add_slo_args(p)
    add_output_args(p)
