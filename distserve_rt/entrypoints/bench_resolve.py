"""Checks and completes `drt-run bench`'s parsed flags before anything runs.

The numeric flags vLLM users pass (``--burstiness``, ``--max-concurrency``, ``--port``,
``--ready-check-timeout-sec``) arrive as strings and are parsed here, so a bad value ends
in one line naming the flag, the value and what is allowed (exit 1), not argparse's usage
dump. The HTTP target is decided here too: ``--base-url``, else ``http://HOST:PORT`` when
any of ``--backend``/``--host``/``--port`` is given (vllm bench serve's defaults,
127.0.0.1:8000), else the in-process engine.
"""

from __future__ import annotations

import argparse
import math

from distserve_rt.benchmarks.serving.metrics import REPORTED_PERCENTILES
from distserve_rt.benchmarks.serving.vllm_flags import (
    PERCENTILE_METRICS,
    parse_goodput,
    parse_metric_percentiles,
    parse_percentile_metrics,
    resolve_endpoint,
)

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


def _number(flag: str, text: str, allowed: str, *, integer: bool = False) -> float:
    try:
        value = int(text) if integer else float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{flag} {text!r} is not a number; allowed: {allowed}") from None
    return value


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Parses the string flags into ``args`` in place (and returns it); ValueError on a bad
    value. Adds ``api`` ("completions"/"chat", None in process) and ``goodput_ms``."""
    burst = _number("--burstiness", args.burstiness, "a number > 0 (1 = Poisson)")
    if not (burst > 0 and math.isfinite(burst)):
        raise ValueError(
            f"--burstiness {args.burstiness!r} must be a finite number > 0 (1 = Poisson, "
            "< 1 burstier, > 1 more even)"
        )
    args.burstiness = burst
    if args.max_concurrency is not None:
        cap = _number("--max-concurrency", args.max_concurrency, "an integer >= 1", integer=True)
        if cap < 1:
            raise ValueError(f"--max-concurrency {args.max_concurrency!r} must be >= 1")
        args.max_concurrency = int(cap)
    wait = _number("--ready-check-timeout-sec", args.ready_check_timeout_sec, "seconds >= 0")
    if not (wait >= 0 and math.isfinite(wait)):
        raise ValueError(
            f"--ready-check-timeout-sec {args.ready_check_timeout_sec!r} must be >= 0 seconds "
            "(0 skips the check)"
        )
    args.ready_check_timeout_sec = wait
    args.goodput_ms = parse_goodput(args.goodput) or None
    args.percentile_metrics = (
        parse_percentile_metrics(args.percentile_metrics)
        if args.percentile_metrics is not None
        else PERCENTILE_METRICS
    )
    args.metric_percentiles = (
        parse_metric_percentiles(args.metric_percentiles)
        if args.metric_percentiles is not None
        else REPORTED_PERCENTILES
    )
    _resolve_target(args)
    return args


def _resolve_target(args: argparse.Namespace) -> None:
    port = None
    if args.port is not None:
        port = _number("--port", args.port, "an integer in 1..65535", integer=True)
        if not 1 <= port <= 65535:
            raise ValueError(f"--port {args.port!r} must be in 1..65535")
    http = args.base_url or args.backend or args.host or port is not None or args.endpoint
    if not http:
        args.api = None
        if args.ready_check_timeout_sec:
            raise ValueError(
                "--ready-check-timeout-sec waits for an HTTP server; give --base-url (or "
                "--backend/--host/--port)"
            )
        return
    if args.compare:  # the same words as _check_compare's for --base-url
        raise ValueError(
            "--compare runs in-process engines; it cannot be used with --base-url (or "
            "--backend/--host/--port)"
        )
    if args.base_url and (args.host or port is not None):
        raise ValueError("--base-url and --host/--port name the server twice; give one")
    if not args.base_url:
        args.base_url = f"http://{args.host or DEFAULT_HOST}:{port or DEFAULT_PORT}"
    if not args.base_url.startswith(("http://", "https://")):
        raise ValueError(f"--base-url {args.base_url!r} must start with http:// or https://")
    args.backend = args.backend or "openai"
    args.api, args.endpoint = resolve_endpoint(args.backend, args.endpoint)
