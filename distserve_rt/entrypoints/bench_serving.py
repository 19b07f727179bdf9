"""`drt-run bench`: the serving benchmark (TTFT/TPOT/ITL/E2E, SLO attainment, goodput).

Sends a workload (a paper dataset's lengths, or random lengths) with forced output lengths
at one or more Poisson/gamma rates, in process or to an OpenAI-compatible server
(--base-url), prints vllm bench serve's table plus SLO attainment, and optionally searches
the per-device goodput (the highest rate meeting the attainment target / --num-devices).
`drt-run bench-plot` overlays saved results (e.g. disaggregated vs colocated).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from distserve_rt.benchmarks.environment import environment
from distserve_rt.benchmarks.serving import (
    BenchSettings,
    EventLoop,
    InProcessBackend,
    OpenAIHTTPBackend,
    ServingBenchmark,
)
from distserve_rt.benchmarks.serving.compare import (
    CompareEntry,
    compare_json,
    format_compare_table,
)
from distserve_rt.benchmarks.serving.http_backend import (
    OpenAIChatHTTPBackend,
    fetch_model_card,
    http_ready_probe,
    wait_until_ready,
)
from distserve_rt.benchmarks.serving.plot import plot_results, plot_summaries
from distserve_rt.benchmarks.serving.report import RunInfo, format_table
from distserve_rt.benchmarks.serving.request_set import prompt_text, tokenizer_special_ids
from distserve_rt.benchmarks.serving.sweep import BenchmarkAborted, sweep_json
from distserve_rt.entrypoints import bench_resolve, bench_serving_args, engine_args, planner_args
from distserve_rt.entrypoints.bench_report import describe_plan, plot_compare, verdict
from distserve_rt.workloads import LengthDist, Workload, get_slo_preset, load_length_file
from distserve_rt.workloads.sharegpt import load_sharegpt


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        conflict_handler="resolve",  # the in-process engine's flags may also define --model
    )
    bench_serving_args.add_all(p)
    p.set_defaults(handler=run)
    plot = sub.add_parser("bench-plot")
    plot.add_argument("results", nargs="+", help="result JSONs saved by drt-run bench")
    plot.add_argument("--output", "-o", default="attainment.png", help="PNG path")
    plot.set_defaults(handler=run_plot)


def run_plot(args: argparse.Namespace) -> int:
    print(f"saved {plot_results(args.results, args.output)}")
    return 0


def is_sharegpt_file(path: str) -> bool:
    """A ShareGPT file is a JSON list; a length file is JSONL or CSV (first byte tells)."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096).lstrip()
    except OSError as exc:
        raise ValueError(f"--dataset-path {path!r}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(f"--dataset-path {path!r}: not a text file") from None
    return head.startswith("[")


def build_workload(args: argparse.Namespace, encode=None) -> tuple[Workload, list | None]:
    """The requests' lengths and, for a ShareGPT file, their prompt ids (``encode``: the
    target's tokenizer); None prompts mean random ids."""
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.dataset_path:
        if args.dataset_name not in (None, "sharegpt"):
            raise ValueError(
                f"--dataset-path gives the requests; drop --dataset-name {args.dataset_name} "
                "(or use --dataset-name sharegpt with a ShareGPT file)"
            )
        if is_sharegpt_file(args.dataset_path):
            workload, prompts = load_sharegpt(
                args.dataset_path, encode, args.num_prompts, seed=args.seed
            )
            if args.length_scale != 1:
                raise ValueError("--length-scale cannot scale a ShareGPT file's real prompts")
            return workload, prompts
        if args.dataset_name == "sharegpt":
            raise ValueError(
                f"--dataset-path {args.dataset_path!r}: --dataset-name sharegpt needs a "
                "ShareGPT-format JSON list (this file is not one)"
            )
        lengths = load_length_file(args.dataset_path).workload()
        workload = lengths.sample(args.num_prompts, seed=args.seed)
        return workload.scaled(args.length_scale), None
    return _named_workload(args), None


def _named_workload(args: argparse.Namespace) -> Workload:
    name = args.dataset_name
    if name is None:
        name = get_slo_preset(args.slo_preset).dataset if args.slo_preset else "sharegpt"
    if name != "random":
        workload = Workload.from_dataset(name).sample(args.num_prompts, seed=args.seed)
        return workload.scaled(args.length_scale)
    if not 0 <= args.random_range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {args.random_range_ratio}")

    def dist(length: int, flag: str) -> LengthDist:
        if length < 1:
            raise ValueError(f"{flag} must be >= 1, got {length}")
        r = args.random_range_ratio
        if r == 0:
            return LengthDist("fixed", length)
        low, high = max(1, math.floor(length * (1 - r))), math.ceil(length * (1 + r))
        return LengthDist("uniform", low=low, high=high)

    prompt = dist(args.random_input_len, "--random-input-len")
    output = dist(args.random_output_len, "--random-output-len")
    workload = Workload.synthetic(args.num_prompts, prompt, output, seed=args.seed)
    return workload.scaled(args.length_scale)


def _http_target(args, loop: EventLoop) -> dict[str, Any]:
    from distserve_rt.tokenizer import get_tokenizer

    if args.ready_check_timeout_sec:
        print(f"Waiting up to {args.ready_check_timeout_sec:g} s for {args.base_url}", flush=True)
        loop.run(
            wait_until_ready(
                http_ready_probe(args.base_url, args.api_key),
                args.ready_check_timeout_sec,
                what=f"the server at {args.base_url}",
            )
        )
    card: dict[str, Any] = {}
    if args.model is None or args.max_model_len is None:
        card = loop.run(_model_card(args.base_url, args.api_key))
    model = args.model or card["id"]
    max_len = args.max_model_len or card.get("max_model_len")
    if max_len is None:
        raise ValueError(f"{args.base_url}/v1/models does not give max_model_len; pass it")
    tokenizer_id = args.tokenizer or model
    tokenizer = get_tokenizer(tokenizer_id)
    common = dict(
        model=model, temperature=args.temperature, endpoint=args.endpoint, name=args.backend
    )
    if args.api == "chat":

        def decode(ids):
            return prompt_text(ids, tokenizer)

        backend = OpenAIChatHTTPBackend(args.base_url, args.api_key, decode=decode, **common)
    else:
        backend = OpenAIHTTPBackend(args.base_url, args.api_key, **common)
    return dict(
        backend=backend,
        model_id=model,
        tokenizer_id=tokenizer_id,
        tokenizer=tokenizer,
        max_model_len=int(max_len),
        engine=None,
    )


async def _model_card(base_url: str, api_key: str | None) -> dict[str, Any]:
    """The server's /v1/models card; a server that cannot be reached is a user error."""
    import httpx

    try:
        return await fetch_model_card(base_url, api_key)
    except httpx.TransportError as exc:
        raise ValueError(
            f"--base-url {base_url}: cannot reach the server ({exc or type(exc).__name__}); "
            "is `drt-run serve` running there?"
        ) from exc


def _in_process_target(args, entry: CompareEntry | None) -> dict[str, Any]:
    if entry is None:
        engine = engine_args.build_engine_client(args)
    else:
        engine = engine_args.build_engine_client(
            args, placement=entry.placement, policy=entry.policy
        )
    return dict(
        backend=InProcessBackend(engine, temperature=args.temperature),
        model_id=engine.model_name,
        tokenizer_id=getattr(args, "tokenizer", None) or engine.model_name,
        tokenizer=engine.tokenizer,
        max_model_len=engine.max_model_len,
        engine=engine,
    )


def _tokenizer_of(name: str | None):
    from distserve_rt.tokenizer import get_tokenizer

    if name is None:
        raise ValueError("--dataset-path with a ShareGPT file needs --tokenizer or --model")
    return get_tokenizer(name)


def _save(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    return path


def _file_stem(label: str) -> str:
    """``label`` safe in a file name on every OS (``colocated:chunked_prefill`` has a colon)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label)


def _metadata(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--metadata takes KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except BenchmarkAborted as exc:
        print(f"drt-run bench: aborted: {exc}")
        return 1
    except ValueError as exc:
        raise SystemExit(f"drt-run bench: {exc}") from None


def _settings(args: argparse.Namespace) -> BenchSettings:
    return BenchSettings(
        planner_args.build_slo(args),  # the same flags and defaults as plan/simulate
        target=args.attainment_target,
        burstiness=args.burstiness,
        seed=args.seed,
        timeout_s=args.request_timeout,
        max_concurrency=args.max_concurrency,
        disable_tqdm=args.disable_tqdm,
        goodput_ms=args.goodput_ms,
    )


def _check_compare(args: argparse.Namespace) -> None:
    if args.compare and args.base_url:
        raise ValueError("--compare runs in-process engines; it cannot be used with --base-url")
    if args.compare and args.placement is not None:
        raise ValueError("--compare gives each setup's placement; drop --placement")
    labels = [e.label for e in args.compare or ()]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--compare lists a setup twice: {labels}")


def _run(args: argparse.Namespace) -> int:
    bench_resolve.resolve(args)
    _check_compare(args)
    settings, metadata = _settings(args), _metadata(args.metadata)
    provenance = environment()
    needs_tokenizer = bool(args.dataset_path) and is_sharegpt_file(args.dataset_path)
    workload = None if needs_tokenizer else build_workload(args)
    if args.compare:
        if workload is None:
            workload = build_workload(args, _tokenizer_of(args.tokenizer or args.model).encode)
        slo = settings.slo
        print(describe_plan(args, workload[0], (slo.ttft_s * 1e3, slo.tpot_s * 1e3)), flush=True)
    outcomes = []
    with EventLoop() as loop:
        for entry in args.compare or [None]:
            bench, search = _run_target(
                args, loop, entry, (settings, workload, metadata, provenance)
            )
            if search is not None or len(bench.runs) > 1 or args.slo_scale:
                print(f"\n--- {bench.info.label}")
            _finish(args, bench, search, provenance)
            outcomes.append((bench, search))
    if args.compare:
        _finish_compare(args, outcomes, provenance)
    return 0


def _run_target(args, loop: EventLoop, entry: CompareEntry | None, common: tuple):
    """Builds one target (the server, the in-process engine, or one --compare setup), runs
    the rates and the goodput search on it, and shuts its engine down. ``common``: the
    settings, workload, metadata and provenance every target shares."""
    settings, workload, metadata, provenance = common
    target = _http_target(args, loop) if args.base_url else _in_process_target(args, entry)
    if workload is None:  # a ShareGPT file: its prompts are the target's tokenizer's ids
        workload = build_workload(args, target["tokenizer"].encode)
    workload, prompts = workload
    backend = target["backend"]
    label = entry.label if entry is not None else args.label or backend.name
    info = RunInfo(
        backend=backend.name,
        model_id=target["model_id"],
        tokenizer_id=target["tokenizer_id"],
        label=label,
        request_rate=math.inf,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        num_clipped=0,
        percentile_metrics=args.percentile_metrics,
        metric_percentiles=args.metric_percentiles,
    )
    bench = ServingBenchmark(
        backend,
        workload,
        info,
        settings,
        vocab_size=target["tokenizer"].vocab_size,
        special_ids=tokenizer_special_ids(target["tokenizer"]),
        max_model_len=target["max_model_len"],
        loop=loop,
        prompts=prompts,
    )
    try:
        bench.warm_up(args.num_warmups)
        search = _bench(args, bench, metadata, provenance)
    finally:
        loop.run(backend.close())
        shutdown = getattr(target["engine"], "shutdown", None)
        if shutdown is not None:
            shutdown()
    return bench, search


def _finish_compare(args, outcomes, provenance) -> None:
    """The side-by-side table of the --compare setups at the asked rates, the verdict line
    and the PNG (``--plot``, else compare-<model>.png in --result-dir; both need a finite
    rate); with --save-result also the JSON (``--result-filename`` or compare-<model>.json)."""
    rows = [
        (bench.info.label, run)
        for rate in args.request_rate
        for bench, _ in outcomes
        for run in bench.runs
        if run.rate == rate and run.source == "sweep"
    ]
    searches = {bench.info.label: search for bench, search in outcomes}
    print("\n============ Setups side by side (same requests, same arrivals) ============")
    print(format_compare_table(rows, searches))
    slo = outcomes[0][0].settings.slo
    print(f"SLOs: TTFT {slo.ttft_s * 1e3:g} ms, TPOT {slo.tpot_s * 1e3:g} ms; latencies in ms")
    sweeps = [sweep_json(bench, search, provenance) for bench, search in outcomes]
    curve = any(math.isfinite(r) for r in args.request_rate)  # inf alone has no rate axis
    if curve:
        print(f"Verdict: {verdict(sweeps)}")
    base = outcomes[0][0].info.model_id.rstrip("/").split("/")[-1].replace(":", "-")
    path = Path(args.result_dir) / (args.result_filename or f"compare-{base}.json")
    if args.save_result:
        payload = {**compare_json(sweeps, rows), **_metadata(args.metadata)}
        payload.update(provenance=provenance, load_average_at_end=list(os.getloadavg()))
        print(f"saved {_save(path, payload)}")
    if curve:  # the picture comes with every comparison: it is what a reader looks at
        print(f"saved {plot_compare(sweeps, args.plot or path.with_suffix('.png'))}")


def _bench(args, bench: ServingBenchmark, metadata, provenance):
    for rate in args.request_rate:
        run = bench.run_at(rate)
        print(f"Traffic request rate: {rate:g}, burstiness {args.burstiness:g}")
        if run.result["num_clipped"]:
            print(f"{run.result['num_clipped']} requests clipped to max_model_len")
        info = replace(bench.info, request_rate=rate, num_clipped=run.result["num_clipped"])
        print(format_table(info, run.metrics))
        if args.save_result:
            payload = {**run.result, **metadata, "provenance": provenance}
            single = len(args.request_rate) == 1 and not args.compare
            name = args.result_filename if single else None
            base = bench.info.model_id.rstrip("/").split("/")[-1].replace(":", "-")
            stem = _file_stem(bench.info.label)
            name = name or f"{stem}-{rate:g}qps-{base}-{payload['date']}.json"
            print(f"saved {_save(Path(args.result_dir) / name, payload)}")
    if not args.goodput_search:
        return None
    finite = [r for r in args.request_rate if math.isfinite(r)]
    return bench.goodput_search(
        num_devices=args.num_devices,
        rate_hint=finite[0] if finite else 1.0,
        rel_tol=args.goodput_rel_tol,
        min_rate=args.goodput_min_rate,
        max_rate=args.goodput_max_rate,
    )


def _finish(args, bench: ServingBenchmark, search, provenance) -> None:
    runs = sorted(bench.runs, key=lambda r: r.rate)
    if len(runs) > 1 or args.slo_scale:
        # Attainment columns: the share of requests meeting both SLOs, TTFT's, TPOT's.
        print(
            f"\n{'rate':>8} {'SLO att.':>8} {'TTFT att.':>9} {'TPOT att.':>9} {'goodput':>8} "
            f"{'slo scale':>9}"
        )
        for r in runs:
            a = r.metrics.attainment
            print(
                f"{r.rate:8.3g} {a.joint:8.1%} {a.ttft:9.1%} {a.tpot:9.1%} "
                f"{r.metrics.request_goodput:8.3f} {r.metrics.slo_scale:9.3f}"
            )
    if search is not None:
        print(
            f"Goodput: {search.rate:.3f} req/s at >= {bench.settings.target:.0%} attainment; "
            f"per device: {search.per_device:.3f} req/s over {search.num_devices} device(s) "
            "(--num-devices; on CPU a device is one core the engine uses)"
        )
    if len(runs) < 2 and search is None:
        return  # one run: its JSON says it all, and one point is no curve
    summary = sweep_json(bench, search, provenance)
    base = bench.info.model_id.rstrip("/").split("/")[-1].replace(":", "-")
    sweep_path = Path(args.result_dir) / f"{_file_stem(bench.info.label)}-sweep-{base}.json"
    if args.save_result:
        print(f"saved {_save(sweep_path, summary)}")
    if args.save_result or args.plot:
        print(f"saved {plot_summaries([summary], args.plot or sweep_path.with_suffix('.png'))}")
