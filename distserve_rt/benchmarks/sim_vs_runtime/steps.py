"""The runtime's steps against the latency model: per step kind, the engine's recorded step
time (its step log) over the model's prediction for the same batch shape.

It tells the two halves of a gap apart: a ratio near 1 with a gap in attainment points at
the simulated scheduling or at time outside the steps (the replay loop, arrivals, output
visibility); a ratio away from 1 points at the calibration (or the machine, which the drift
probe measures beside it)."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import pairwise

from distserve_rt.engine.step_log import STEP_KINDS, StepRecord, StepShape
from distserve_rt.planner.latency_model import LatencyModel


def predicted_s(latency: LatencyModel, shape: StepShape) -> float:
    """The model's time (s) of a step of ``shape``, as the scheduler-driven simulator's
    clock computes it (`driven_instance.StepClock`, without noise)."""
    if shape.num_prefills and shape.num_decodes:
        return latency.mixed_s(
            shape.num_prefill_tokens,
            shape.prefill_attn_work,
            shape.num_decodes,
            shape.sum_decode_seq_lens,
        )
    if shape.num_prefills:
        return latency.prefill_s(shape.num_prefill_tokens, shape.prefill_attn_work)
    return latency.decode_s(shape.num_decodes, shape.sum_decode_seq_lens)


def step_time_ratios(records: Iterable[StepRecord], latency: LatencyModel) -> dict[str, float]:
    """Per kind present: ``step_ratio_{kind}`` = Σ measured / Σ predicted (time-weighted:
    what the run's latencies feel), ``num_{kind}_steps`` and ``mean_{kind}_step_ms``."""
    measured = dict.fromkeys(STEP_KINDS, 0.0)
    predicted = dict.fromkeys(STEP_KINDS, 0.0)
    counts = dict.fromkeys(STEP_KINDS, 0)
    for record in records:
        kind = record.shape.kind
        if kind not in counts:  # empty steps are not recorded; nothing else to skip
            continue
        measured[kind] += record.duration_s
        predicted[kind] += predicted_s(latency, record.shape)
        counts[kind] += 1
    out: dict[str, float] = {}
    for kind, n in counts.items():
        if n:
            out[f"step_ratio_{kind}"] = measured[kind] / predicted[kind]
            out[f"num_{kind}_steps"] = float(n)
            out[f"mean_{kind}_step_ms"] = 1e3 * measured[kind] / n
    return out


BUSY_GAP_S = 0.002
"""A pause between two steps of one instance shorter than this is its loop's work (the
controller's messages, pulls, outputs sent), not an idle wait for requests."""


def loop_gaps_s(records: Iterable[StepRecord]) -> dict[str, float]:
    """Per step kind present, the mean pause (s) between consecutive steps of that kind
    shorter than `BUSY_GAP_S`, from the records' start times: a 1P1D instance runs one kind,
    so this is its loop's time per step (`ProcessHops.prefill_loop_s`/``decode_loop_s``).
    Records without a start time are skipped; a kind with no such pause is left out."""
    by_kind: dict[str, list[StepRecord]] = {}
    for record in records:
        if record.shape.kind in STEP_KINDS:
            by_kind.setdefault(record.shape.kind, []).append(record)
    out = {}
    for kind, rs in by_kind.items():
        gap = _mean_busy_gap_s(rs)
        if gap is not None:
            out[kind] = gap
    return out


def engine_loop_s(records: Iterable[StepRecord]) -> float | None:
    """The mean pause (s) between consecutive steps of one colocated engine (any kinds)
    shorter than `BUSY_GAP_S`: its loop's time per step (building outputs, adding arrived
    requests), which `ColocatedSetup.loop_s` simulates. None without such a pause."""
    return _mean_busy_gap_s(records)


def _mean_busy_gap_s(records: Iterable[StepRecord]) -> float | None:
    """Mean pause (s) between consecutive ``records`` (by start time; those without one
    skipped) shorter than `BUSY_GAP_S`; None without such a pause."""
    timed = sorted((r for r in records if r.start_s is not None), key=lambda r: r.start_s)
    gaps = [b.start_s - (a.start_s + a.duration_s) for a, b in pairwise(timed)]
    busy = [g for g in gaps if 0 <= g < BUSY_GAP_S]
    return sum(busy) / len(busy) if busy else None
