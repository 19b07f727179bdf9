"""`drt-run bench --compare`: the same requests on several engine setups, side by side.

Each entry is ``PLACEMENT[:POLICY]`` (``colocated``, ``disaggregated``, a placement YAML, and
for colocated entries optionally the scheduling policy, e.g. ``colocated:chunked_prefill``).
Every entry gets its own in-process engine and replays the same request set (lengths, token
ids and arrival gaps are seeded, see `sweep`), so the rows differ only by the setup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distserve_rt.benchmarks.serving.sweep import GoodputSearchResult, RunResult
from distserve_rt.config import Placement
from distserve_rt.core.scheduler import POLICIES


@dataclass(frozen=True)
class CompareEntry:
    """One engine setup of a comparison."""

    label: str
    """The entry as given on the command line; the run's label in tables, JSON and plots."""
    placement: Placement
    policy: str | None = None
    """Colocated scheduling policy; None keeps --policy."""

    def __post_init__(self) -> None:
        if self.policy is not None and self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {self.policy!r}")
        if self.policy is not None and self.placement.is_disaggregated:
            raise ValueError(
                f"{self.label!r}: a policy applies to colocated placements only (the "
                "disaggregated instances schedule each phase on their own)"
            )

    @classmethod
    def parse(cls, text: str) -> CompareEntry:
        """``PLACEMENT[:POLICY]``; ValueError naming what is allowed."""
        base, sep, policy = text.rpartition(":")
        if not sep or policy not in POLICIES:
            base, policy = text, ""
        return cls(text, Placement.parse(base), policy or None)


_COLUMNS = (
    ("setup", 26, "{}"),
    ("rate", 6, "{:g}"),
    ("completed", 9, "{}"),
    ("TTFT mean", 9, "{:.1f}"),
    ("TTFT p90", 9, "{:.1f}"),
    ("TPOT mean", 9, "{:.2f}"),
    ("TPOT p90", 9, "{:.2f}"),
    ("E2E mean", 9, "{:.1f}"),
    ("SLO att.", 8, "{:.1%}"),
    ("goodput", 8, "{:.2f}"),
    ("out tok/s", 9, "{:.0f}"),
)


def _cells(label: str, run: RunResult) -> list[Any]:
    m = run.metrics
    return [
        label,
        run.rate,
        f"{m.completed}/{m.num_requests}",
        m.ttft.mean,
        m.ttft.p90,
        m.tpot.mean,
        m.tpot.p90,
        m.e2el.mean,
        m.attainment.joint,
        m.request_goodput,
        m.output_throughput,
    ]


def format_compare_table(
    rows: list[tuple[str, RunResult]], searches: dict[str, GoodputSearchResult | None]
) -> str:
    """The side-by-side table: one row per (setup, rate). Latencies in ms, goodput in req/s
    meeting both SLOs, then each setup's per-device goodput when it was searched."""

    def line(texts: list[str]) -> str:
        # The setup column reads left-aligned, the numbers right-aligned.
        pairs = enumerate(zip(texts, _COLUMNS, strict=True))
        return " ".join(f"{t:{'<' if i == 0 else '>'}{c[1]}}" for i, (t, c) in pairs)

    lines = [line([name for name, _, _ in _COLUMNS])]
    for label, run in rows:
        cells = _cells(label, run)
        lines.append(
            line(
                ["-" if v is None else c[2].format(v) for v, c in zip(cells, _COLUMNS, strict=True)]
            )
        )
    found = {label: s for label, s in searches.items() if s is not None}
    if found:
        best = max(s.per_device for s in found.values())
        lines.append("per-device goodput (req/s per device at the attainment target):")
        for label, s in found.items():
            ratio = f" ({s.per_device / best:.2f}x of the best)" if best > 0 else ""
            lines.append(
                f"  {label:<24} {s.per_device:8.3f} = {s.rate:.3f} req/s over "
                f"{s.num_devices} device(s){ratio}"
            )
    return "\n".join(lines)


def compare_json(sweeps: list[dict[str, Any]], rows: list[tuple[str, RunResult]]) -> dict:
    """The setups' sweep JSONs (`sweep.sweep_json`, what `plot` overlays) and the table."""
    table = [{"setup": label, **run.summary()} for label, run in rows]
    for entry, (_, run) in zip(table, rows, strict=True):
        entry.update(
            mean_ttft_ms=run.metrics.ttft.mean,
            mean_tpot_ms=run.metrics.tpot.mean,
            mean_e2el_ms=run.metrics.e2el.mean,
            output_throughput=run.metrics.output_throughput,
        )
    return {"setups": [s["label"] for s in sweeps], "table": table, "sweeps": sweeps}
