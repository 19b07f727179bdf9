"""Least-squares fits of the latency-model coefficients from measured step times.

Both forms are linear in their coefficients, so each fit is one weighted linear least
squares: rows are divided by the measured time, which minimises the **relative** error
(a 1 ms error matters for a 10 ms decode step, not for a 2 s prefill). The fit error is
reported as mean and max relative error over the samples.

Samples (times in ms, lengths in tokens):
* prefill: ``(prompt_lens, time_ms)`` — one batch of prompts;
* decode: ``(ctx_lens, time_ms)`` — one step of ``len(ctx_lens)`` requests whose contexts
  hold ``ctx_lens`` tokens before the step (DistServe's Σ(ctx+1) counts the new token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from distserve_rt.models.config import ModelConfig
from distserve_rt.planner.latency_model import (
    AnalyticCoefficients,
    FittedCoefficients,
    analytic_features,
)

PrefillSample = tuple[Sequence[int], float]
DecodeSample = tuple[Sequence[int], float]


@dataclass(frozen=True, slots=True)
class FitError:
    """Relative error of a fit over its samples (0.05 = 5%)."""

    mean_rel: float
    max_rel: float
    num_samples: int

    def to_dict(self) -> dict[str, float]:
        return {"mean_rel": self.mean_rel, "max_rel": self.max_rel, "num_samples": self.num_samples}


def _relative_lstsq(
    x: np.ndarray, y: np.ndarray, what: str, nonnegative: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients minimising Σ((x·c − y)/y)² and the relative errors ``[num_samples]``.

    ``nonnegative``: a coefficient that comes out negative is fixed at 0 and the rest refit,
    until none is negative (a simple active-set NNLS; the analytic form's C's are costs
    per unit of work, and a negative one would only compensate another term's misfit).
    """
    if x.shape[0] < x.shape[1]:
        raise ValueError(
            f"{what}: {x.shape[0]} samples cannot fit {x.shape[1]} coefficients; "
            f"measure at least {x.shape[1]} distinct batches"
        )
    if np.any(y <= 0):
        raise ValueError(f"{what}: measured times must be > 0 ms, got min {y.min()!r}")
    active = np.ones(x.shape[1], dtype=bool)
    coef = np.zeros(x.shape[1])
    while active.any():
        coef[:] = 0.0
        coef[active], *_ = np.linalg.lstsq(x[:, active] / y[:, None], np.ones_like(y), rcond=None)
        if not nonnegative or coef.min() >= 0:
            break
        active &= coef > 0
    return coef, np.abs(x @ coef - y) / y


def _error(rel: np.ndarray) -> FitError:
    return FitError(float(rel.mean()), float(rel.max()), int(rel.size))


def _prefill_rows(samples: Sequence[PrefillSample]) -> tuple[np.ndarray, np.ndarray]:
    rows, times = [], []
    for lens, time_ms in samples:
        lens = np.asarray(lens, dtype=np.float64)
        rows.append((lens.sum(), (lens * lens).sum()))
        times.append(time_ms)
    return np.asarray(rows, dtype=np.float64).reshape(-1, 2), np.asarray(times, dtype=np.float64)


def _decode_rows(samples: Sequence[DecodeSample]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Σ(ctx+1), batch) per sample, times, batch sizes."""
    rows, times = [], []
    for ctx, time_ms in samples:
        ctx = np.asarray(ctx, dtype=np.float64)
        rows.append(((ctx + 1).sum(), ctx.size))
        times.append(time_ms)
    x = np.asarray(rows, dtype=np.float64).reshape(-1, 2)
    return x, np.asarray(times, dtype=np.float64), x[:, 1]


def fit_fitted_form(
    prefill: Sequence[PrefillSample], decode: Sequence[DecodeSample], decode_threshold: int = 95
) -> tuple[FittedCoefficients, dict[str, FitError]]:
    """DistServe's form from samples; errors keyed "prefill", "decode_small", "decode_large".

    When every decode sample falls on one side of ``decode_threshold``, both decode fits are
    that one fit (reported once, under the side that had samples).
    """
    px, py = _prefill_rows(prefill)
    pc, prel = _relative_lstsq(np.column_stack([np.ones(len(py)), px]), py, "prefill fit")
    errors = {"prefill": _error(prel)}
    dx, dy, batch = _decode_rows(decode)
    design = np.column_stack([np.ones(len(dy)), dx])
    fits = {}
    for name, mask in (
        ("decode_small", batch < decode_threshold),
        ("decode_large", batch >= decode_threshold),
    ):
        if mask.any():
            fits[name], rel = _relative_lstsq(design[mask], dy[mask], f"{name} fit")
            errors[name] = _error(rel)
    if not fits:
        raise ValueError("decode fit: no decode samples given")
    small = fits.get("decode_small", fits.get("decode_large"))
    large = fits.get("decode_large", small)
    coeffs = FittedCoefficients(tuple(pc), tuple(small), tuple(large), decode_threshold)
    return coeffs, errors


def fit_analytic_form(
    prefill: Sequence[tuple[ModelConfig, int, Sequence[int], float]],
    decode: Sequence[tuple[ModelConfig, int, Sequence[int], float]],
    attn_block_size: int = 128,
) -> tuple[AnalyticCoefficients, dict[str, FitError]]:
    """The paper's C1..C5 (and our C6) from samples ``(model, tp, lens, time_ms)``.

    Samples may mix models and TP degrees of one kind of hardware. Errors keyed "prefill"
    and "decode"."""
    prow, ptime = [], []
    for model, tp, lens, time_ms in prefill:
        f = analytic_features(model, tp)
        lens = np.asarray(lens, dtype=np.float64)
        prow.append((f["f1"] * lens.sum(), f["f2"] * (lens * lens).sum() / attn_block_size, 1.0))
        ptime.append(time_ms)
    drow, dtime = [], []
    for model, tp, ctx, time_ms in decode:
        f = analytic_features(model, tp)
        drow.append((f["f4"], f["f5"] * (np.asarray(ctx, dtype=np.float64) + 1).sum(), 1.0))
        dtime.append(time_ms)
    pc, prel = _relative_lstsq(np.asarray(prow), np.asarray(ptime), "analytic prefill fit", True)
    dc, drel = _relative_lstsq(np.asarray(drow), np.asarray(dtime), "analytic decode fit", True)
    coeffs = AnalyticCoefficients(*(float(v) for v in (*pc, *dc)), attn_block_size=attn_block_size)
    return coeffs, {"prefill": _error(prel), "decode": _error(drel)}
