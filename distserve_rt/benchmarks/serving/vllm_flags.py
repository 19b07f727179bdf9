"""The ``vllm bench serve`` flags whose meaning is vLLM's, parsed and checked as vLLM does.

``--goodput KEY:MS ...`` (ttft, tpot, e2el), ``--percentile-metrics`` and
``--metric-percentiles``, ``--backend``/``--endpoint``. Each parser raises ValueError with
one line naming the flag, the value and what is allowed (vLLM's wording where it has one),
so `drt-run bench` exits 1 with that line instead of a traceback.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

GOODPUT_METRICS = ("ttft", "tpot", "e2el")
PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")

BACKENDS = {"openai": "completions", "vllm": "completions", "openai-chat": "chat"}
"""``--backend`` -> the API it speaks. vLLM's ``vllm`` backend is its completions client."""
DEFAULT_ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def parse_goodput(pairs: Sequence[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds).

    vLLM's ``parse_goodput`` + ``check_goodput_args``: KEY:VALUE pairs, keys among
    `GOODPUT_METRICS`, values non-negative numbers."""
    config: dict[str, float] = {}
    for pair in pairs or ():
        name, sep, value = pair.partition(":")
        try:
            if not sep or ":" in value:
                raise ValueError
            config[name] = float(value)
        except ValueError:
            raise ValueError(
                f"--goodput {pair!r}: Invalid format found for service level objectives. "
                'Specify service level objectives for goodput as "KEY:VALUE" pairs, where '
                "the key is a metric name, and the value is a number in milliseconds."
            ) from None
        if name not in GOODPUT_METRICS:
            raise ValueError(
                f"--goodput: Invalid metric name found, {name}: {config[name]}. The service "
                f"level objective name should be one of {list(GOODPUT_METRICS)}."
            )
        if not config[name] >= 0:  # also refuses nan
            raise ValueError(
                f"--goodput: Invalid value found, {name}: {config[name]}. The service level "
                "objective value should be non-negative."
            )
    return config


def parse_percentile_metrics(text: str) -> tuple[str, ...]:
    """``"ttft,tpot"`` -> ``("ttft", "tpot")``, each among `PERCENTILE_METRICS`."""
    names = tuple(n.strip() for n in text.split(","))
    bad = [n for n in names if n not in PERCENTILE_METRICS]
    if bad or not names:
        raise ValueError(
            f"--percentile-metrics {text!r}: unknown metric {bad[0]!r}; allowed: a "
            f"comma-separated list of {', '.join(PERCENTILE_METRICS)}"
        )
    return tuple(dict.fromkeys(names))


def parse_metric_percentiles(text: str) -> tuple[float, ...]:
    """``"50,90,99"`` -> ``(50.0, 90.0, 99.0)``, each in [0, 100]."""
    out = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not 0 <= value <= 100:
            raise ValueError(
                f"--metric-percentiles {text!r}: {item.strip()!r} is not a percentile; "
                "allowed: a comma-separated list of numbers in [0, 100], e.g. 50,90,99"
            )
        out.append(value)
    return tuple(dict.fromkeys(out))


def percentile_word(p: float) -> str:
    """vLLM's spelling of a percentile in keys and rows: 99 -> "99", 99.9 -> "99.9"."""
    return str(int(p)) if int(p) == p else str(p)


def resolve_endpoint(backend: str, endpoint: str | None) -> tuple[str, str]:
    """(api, endpoint) for ``--backend`` and ``--endpoint`` (None: the backend's default).

    vLLM refuses a chat backend whose URL does not end in ``chat/completions`` and a
    completions backend whose URL does not end in ``completions``; so do we, naming both."""
    if backend not in BACKENDS:
        raise ValueError(
            f"--backend {backend!r} is not supported; allowed: {', '.join(BACKENDS)} "
            "(the OpenAI completions and chat completions APIs)"
        )
    api = BACKENDS[backend]
    endpoint = endpoint or DEFAULT_ENDPOINTS[api]
    if not endpoint.startswith("/"):
        raise ValueError(f"--endpoint {endpoint!r} must be a path starting with '/'")
    suffix = "chat/completions" if api == "chat" else "completions"
    if not endpoint.rstrip("/").endswith(suffix) or (
        api == "completions" and endpoint.rstrip("/").endswith("chat/completions")
    ):
        raise ValueError(
            f"--endpoint {endpoint!r} does not fit --backend {backend}: its URL must end "
            f"with '{suffix}' (e.g. {DEFAULT_ENDPOINTS[api]})"
        )
    return api, endpoint


def count_good(
    ttfts_s: Sequence[float],
    tpots_s: Sequence[float],
    e2els_s: Sequence[float],
    goodput_ms: dict[str, float],
) -> int:
    """Successful requests meeting every objective of ``goodput_ms`` (vLLM's
    ``calculate_metrics``: per-request values of the successful requests, a one-token
    output's TPOT counted as 0, a request good when each value <= its SLO)."""
    columns = {"ttft": ttfts_s, "tpot": tpots_s, "e2el": e2els_s}
    picked = [(columns[k], v / 1000.0) for k, v in goodput_ms.items()]
    n = len(ttfts_s)
    return sum(all(col[i] <= slo for col, slo in picked) for i in range(n))
