"""Runs op cases: check each against its fp32 reference, then time ours and the baseline."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass

from distserve_rt.benchmarks.op_cases import OpCase
from distserve_rt.benchmarks.timing import Timing, time_call


@dataclass
class OpResult:
    case: OpCase
    rel_error: float
    ours: Timing
    baseline: Timing

    @property
    def speedup(self) -> float:
        """Baseline time / our time: > 1 means our kernel is faster."""
        return self.baseline.median_s / self.ours.median_s

    def to_dict(self) -> dict[str, object]:
        c = self.case
        d: dict[str, object] = {
            "op": c.op,
            "params": c.params,
            "baseline": c.baseline_name,
            "rel_error": self.rel_error,
            "tolerance": c.tolerance,
            "ours_median_ms": self.ours.median_s * 1e3,
            "baseline_median_ms": self.baseline.median_s * 1e3,
            "speedup_vs_baseline": self.speedup,
            "runs": {"ours": self.ours.num_runs, "baseline": self.baseline.num_runs},
        }
        if c.bytes_moved:
            d["ours_GBps"] = c.bytes_moved / self.ours.median_s / 1e9
            d["baseline_GBps"] = c.bytes_moved / self.baseline.median_s / 1e9
        if c.flops:
            d["ours_GFLOPs"] = c.flops / self.ours.median_s / 1e9
            d["baseline_GFLOPs"] = c.flops / self.baseline.median_s / 1e9
        return d


class CorrectnessError(RuntimeError):
    pass


def run_case(case: OpCase, min_time_s: float) -> OpResult:
    err = case.check()
    if not err <= case.tolerance:  # also catches NaN / inf
        raise CorrectnessError(
            f"{case.label}: relative error {err:.3g} exceeds {case.tolerance:g}; not timing it"
        )
    ours = time_call(case.ours, min_time_s)
    baseline = time_call(case.baseline, min_time_s)
    return OpResult(case, err, ours, baseline)


def run_suite(cases: Iterable[OpCase], min_time_s: float = 0.3) -> list[OpResult]:
    cases = list(cases)
    results = []
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.label} ...", file=sys.stderr, flush=True)
        results.append(run_case(case, min_time_s))
    return results


def _throughput(result: OpResult) -> str:
    c = result.case
    if c.flops and not c.memory_bound:
        return f"{c.flops / result.ours.median_s / 1e9:8.1f} GFLOP/s"
    if c.bytes_moved:
        return f"{c.bytes_moved / result.ours.median_s / 1e9:8.2f} GB/s"
    return ""


def format_table(results: list[OpResult]) -> str:
    rows = [("case", "ours ms", "baseline ms", "speedup", "throughput", "rel err", "baseline")]
    for r in results:
        rows.append(
            (
                r.case.label,
                f"{r.ours.median_s * 1e3:.3f}",
                f"{r.baseline.median_s * 1e3:.3f}",
                f"{r.speedup:.2f}x",
                _throughput(r).strip(),
                f"{r.rel_error:.1e}",
                r.case.baseline_name,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
