"""Repeats of one (target, rate): runtime and simulated attainment over the repeats, their
spread, and the gap the acceptance bar is about (runtime minus simulated, in points)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SIDES = ("runtime", "simulated", "simulated_rescaled")
"""The rows each repeat holds: served, simulated with the profile, and with the profile
rescaled by that repeat's drift ratio."""

IN_RUN = "simulated_in_run"
"""The row a repeat with a step log also holds: simulated at its own steps' speed
(`runs.in_run_simulation`; from the calibration at the rate where there is one)."""

AT_LOAD = "simulated_at_load"
"""The row of a repeat calibrated at its rate: simulated with the latency model fitted on
the engine's steps serving held-out requests at that rate (`calibration.calibrate_at_load`)."""

OPTIONAL_SIDES = {IN_RUN: "gap_in_run_pp", AT_LOAD: "gap_at_load_pp"}


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, min, max and sample std (0 for one value) of ``values``."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("spread needs at least one value, got none")
    return {
        "mean": float(arr.mean()),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
    }


def summarize_repeats(repeats: Sequence[dict]) -> dict[str, object]:
    """``repeats``: one dict per repeat with a row per `SIDES` key (each with an
    ``attainment`` in 0..1) and ``drift_ratio`` ({"prefill_ms", "decode_ms"}).

    Returns each side's attainment spread, the drift ratios' spread, the standard error of
    the runtime's mean (``runtime_mean_se_pp``, points; 0 for one repeat), and the gaps in
    points between the runtime's mean and each simulated mean (``gap_pp``: with the profile as
    measured; ``gap_rescaled_pp``: with the drift taken out; ``gap_in_run_pp``, when every
    repeat has an `IN_RUN` row: at the speed the runs' steps had; ``gap_at_load_pp``, when
    every repeat has an `AT_LOAD` row: calibrated at the rate on held-out requests).
    """
    out: dict[str, object] = {"num_repeats": len(repeats)}
    optional = [side for side in OPTIONAL_SIDES if all(side in r for r in repeats)]
    sides = (*SIDES, *optional)
    for side in sides:
        out[f"{side}_attainment"] = spread([r[side]["attainment"] for r in repeats])
    for key in ("prefill_ms", "decode_ms"):
        out[f"drift_{key.removesuffix('_ms')}"] = spread([r["drift_ratio"][key] for r in repeats])
    runtime = out["runtime_attainment"]["mean"]  # type: ignore[index]
    # How far the runtime's own mean would move on another set of repeats: the standard
    # error of the mean, in points. A gap far inside it cannot be told from the machine.
    std = out["runtime_attainment"]["std"]  # type: ignore[index]
    out["runtime_mean_se_pp"] = 100 * std / np.sqrt(len(repeats))
    out["gap_pp"] = 100 * (runtime - out["simulated_attainment"]["mean"])  # type: ignore[index]
    out["gap_rescaled_pp"] = 100 * (
        runtime - out["simulated_rescaled_attainment"]["mean"]  # type: ignore[index]
    )
    for side in optional:
        simulated = out[f"{side}_attainment"]["mean"]  # type: ignore[index]
        out[OPTIONAL_SIDES[side]] = 100 * (runtime - simulated)
    return out
