"""Attainment vs rate, one line per run label (e.g. disaggregated vs colocated).

Reads the JSON files `drt-run bench` saves: a sweep file (``runs`` list) or single-run
files (``request_rate`` + ``attainment``); runs of one label from several files join one
line. A rate of inf (everything at once) has no place on a rate axis and is left out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from distserve_rt.planner.plot import plot_attainment


def _points(data: dict[str, Any]) -> list[tuple[float, float]]:
    runs = data.get("runs", [data])
    points = []
    for run in runs:
        rate = float(run["request_rate"])  # "inf" parses to inf
        if math.isfinite(rate):
            points.append((rate, float(run["attainment"]["joint"])))
    return points


def attainment_curves(results: list[dict[str, Any]]) -> tuple[dict[str, list], float]:
    """``{label: [(rate, attainment), ...]}`` from loaded results, and their common target."""
    curves: dict[str, list[tuple[float, float]]] = {}
    targets = set()
    for i, data in enumerate(results):
        if "attainment" not in data and "runs" not in data:
            raise ValueError(f"result {i} is not a drt-run bench result (no attainment or runs)")
        label = data.get("label") or data.get("backend") or f"run {i}"
        curves.setdefault(label, []).extend(_points(data))
        targets.add(float(data["slo"]["target"]))
    if len(targets) > 1:
        raise ValueError(f"results use different attainment targets {sorted(targets)}")
    return {k: sorted(set(v)) for k, v in curves.items()}, targets.pop() if targets else 0.9


def plot_summaries(results: list[dict[str, Any]], output: str | Path) -> Path:
    """Overlays the attainment-vs-rate lines of loaded ``results`` in one PNG."""
    if not results:
        raise ValueError("give at least one result to plot")
    curves, target = attainment_curves(results)
    return plot_attainment(curves, target, output)


def plot_results(paths: list[str | Path], output: str | Path) -> Path:
    """Overlays the attainment-vs-rate lines of the JSON files ``paths`` in one PNG."""
    return plot_summaries([json.loads(Path(p).read_text()) for p in paths], output)
