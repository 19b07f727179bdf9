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

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from distserve_rt.models.config import ModelConfig
from distserve_rt.planner.latency_model import (
    AnalyticCoefficients,
    FittedCoefficients,
    FittedLatencyModel,
    analytic_features,
)
from distserve_rt.planner.step_noise import StepTimeNoise

PrefillSample = tuple[Sequence[int], float]
DecodeSample = tuple[Sequence[int], float]


@dataclass(frozen=True, slots=True)
class FitError:
    """Relative error of a fit over its samples (0.05 = 5%)."""

    mean_rel: float
    max_rel: float
    num_samples: int
    p90_rel: float | None = None
    """90th percentile (engine-step fits; None in older profiles)."""

    def to_dict(self) -> dict[str, float]:
        out = {"mean_rel": self.mean_rel, "max_rel": self.max_rel, "num_samples": self.num_samples}
        if self.p90_rel is not None:
            out["p90_rel"] = self.p90_rel
        return out


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
    return FitError(
        float(rel.mean()), float(rel.max()), int(rel.size), float(np.quantile(rel, 0.9))
    )


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


# ---- fits from the running engine's steps ---------------------------------------------------

ENGINE_STEP_KINDS = ("prefill", "decode", "mixed")


@dataclass(frozen=True, slots=True)
class EngineStepFit:
    """`fit_engine_steps`' result: the model, its errors and the step-time noise."""

    coefficients: FittedCoefficients
    fit_error: dict[str, FitError]
    """In-sample per-step error, keyed "prefill", "decode_small"/"decode_large", "mixed"."""
    held_out_error: dict[str, FitError]
    """Per-step error on steps whose shapes the fit never saw, keyed by step kind."""
    noise: dict[str, StepTimeNoise]
    """measured/predicted per step kind, and "all" pooled (`step_noise`)."""
    borrowed: tuple[str, ...] = ()
    """Fit groups whose coefficients came from ``fit_engine_steps``' ``fallback``."""


def _step_table(records) -> dict[str, np.ndarray]:
    """Columns of the records (`engine.step_log.StepRecord` or the same fields), ms."""
    cols = {
        k: np.asarray([getattr(r.shape, k) for r in records], dtype=np.float64)
        for k in (
            "num_prefills",
            "num_prefill_tokens",
            "prefill_attn_work",
            "num_decodes",
            "sum_decode_seq_lens",
        )
    }
    cols["ms"] = np.asarray([r.duration_s for r in records], dtype=np.float64) * 1e3
    cols["host_ms"] = cols["ms"] - np.asarray([r.execute_s for r in records]) * 1e3
    return cols


def _design(kind: str, c: dict[str, np.ndarray]) -> np.ndarray:
    """Per-step features of the kind's form (latency_model's module docstring)."""
    one = np.ones_like(c["ms"])
    if kind == "prefill":
        return np.column_stack([one, c["num_prefill_tokens"], c["prefill_attn_work"]])
    if kind == "decode":
        return np.column_stack([one, c["sum_decode_seq_lens"], c["num_decodes"]])
    tokens = c["num_prefill_tokens"] + c["num_decodes"]
    return np.column_stack([one, tokens, c["prefill_attn_work"], c["sum_decode_seq_lens"]])


def _fit_offset_medians(x: np.ndarray, y: np.ndarray, overhead: float, what: str) -> np.ndarray:
    """Coefficients of ``overhead + x·c ≈ y`` fitted on the median step of each distinct
    shape (repeats of one shape count once, and a slow outlier among them not at all);
    relative error, nonnegative coefficients; then scaled so the model predicts the mean
    step (the noise table carries the spread around it, mean 1)."""
    shapes, inverse = np.unique(x, axis=0, return_inverse=True)
    medians = np.asarray([np.median(y[inverse.ravel() == i]) for i in range(len(shapes))])
    if len(shapes) < x.shape[1]:
        raise ValueError(
            f"{what}: {len(shapes)} distinct step shapes cannot fit {x.shape[1]} coefficients; "
            f"run a longer or more varied workload"
        )
    # Σ((overhead + x·c − y)/y)² is a least squares in c with target 1 − overhead/y.
    scale = 1.0 / medians
    active = np.ones(x.shape[1], dtype=bool)
    coef = np.zeros(x.shape[1])
    while active.any():
        coef[:] = 0.0
        a = shapes[:, active] * scale[:, None]
        coef[active], *_ = np.linalg.lstsq(a, 1.0 - overhead * scale, rcond=None)
        if coef.min() >= 0:
            break
        active &= coef > 0
    return _rescaled(coef, x, y, overhead)


def _split(kind_mask: np.ndarray, x: np.ndarray, rng, held_out: float) -> np.ndarray:
    """Held-out mask: a random ``held_out`` share of the kind's distinct shapes (all of
    their steps), none when the kind has too few shapes to spare any."""
    out = np.zeros(kind_mask.size, dtype=bool)
    idx = np.flatnonzero(kind_mask)
    shapes, inverse = np.unique(x[idx], axis=0, return_inverse=True)
    num_test = int(len(shapes) * held_out)
    if num_test < 1 or len(shapes) - num_test < 2 * x.shape[1]:
        return out
    test = rng.choice(len(shapes), num_test, replace=False)
    out[idx[np.isin(inverse.ravel(), test)]] = True
    return out


def _kind_masks(c: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    has_p, has_d = c["num_prefills"] > 0, c["num_decodes"] > 0
    return {"prefill": has_p & ~has_d, "decode": has_d & ~has_p, "mixed": has_p & has_d}


def _fit_kinds(
    c, masks, overhead: float, threshold: int, fallback: FittedCoefficients | None = None
) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """Coefficients per fit group ("prefill", "decode_small", "decode_large", "mixed"), and
    the groups borrowed from ``fallback`` (too few distinct shapes to fit their form: its
    coefficients, scaled so they predict the mean of the group's steps when it has any)."""
    fits, borrowed = {}, []
    groups = {
        "prefill": masks["prefill"],
        "decode_small": masks["decode"] & (c["num_decodes"] < threshold),
        "decode_large": masks["decode"] & (c["num_decodes"] >= threshold),
        "mixed": masks["mixed"],
    }
    for name, mask in groups.items():
        x = _design(name.split("_")[0], c)[mask]
        if len(np.unique(x, axis=0)) >= 2 * x.shape[1]:  # twice the unknowns, at least
            fits[name] = _fit_offset_medians(x, c["ms"][mask], overhead, f"{name} fit")
        elif fallback is not None and mask.any() and getattr(fallback, name) is not None:
            fits[name] = _rescaled(np.asarray(getattr(fallback, name)), x, c["ms"][mask], overhead)
            borrowed.append(name)
    if fallback is not None:  # a needed kind without a single step keeps the fallback's
        decode_fitted = any(k.startswith("decode") for k in fits)
        for name in ("prefill", "decode_small", "decode_large"):  # mixed: optional
            if decode_fitted and name.startswith("decode"):
                continue  # the other decode group stands in, as without a fallback
            if name not in fits:
                fits[name] = np.asarray(getattr(fallback, name))
                borrowed.append(name)
    for kind in ("prefill", "decode"):
        if not any(k.startswith(kind) for k in fits):
            raise ValueError(
                f"engine step fit: too few {kind}-only steps ({int(masks[kind].sum())}); the "
                f"workload must produce at least 6 of distinct shapes (run more steps)"
            )
    return fits, tuple(borrowed)


def _rescaled(coef: np.ndarray, x: np.ndarray, y: np.ndarray, overhead: float) -> np.ndarray:
    """``coef`` scaled so that ``overhead + x·coef`` predicts the mean of ``y`` (the last
    step of a fit, and a borrowed group's only one); unchanged when it puts every step at
    the overhead (nothing to scale)."""
    work = x @ coef
    if np.any(work <= 0):
        return coef
    return coef * float(np.mean((y - overhead) / work))


def _coefficients(fits, overhead: float, threshold: int) -> FittedCoefficients:
    small = fits.get("decode_small", fits.get("decode_large"))
    large = fits.get("decode_large", small)
    mixed = fits.get("mixed")
    return FittedCoefficients(
        tuple(fits["prefill"]),
        tuple(small),
        tuple(large),
        threshold,
        overhead,
        None if mixed is None else tuple(mixed),
    )


def _predict_ms(co: FittedCoefficients, kind: str, c: dict[str, np.ndarray]) -> np.ndarray:
    lm, rows = FittedLatencyModel(co), zip(*(c[k].tolist() for k in _FEATURES), strict=True)
    out = []
    for p_tok, p_work, n_dec, s_dec in rows:
        if kind == "prefill":
            out.append(lm.prefill_s(p_tok, p_work))
        elif kind == "decode":
            out.append(lm.decode_s(int(n_dec), s_dec))
        else:
            out.append(lm.mixed_s(p_tok, p_work, int(n_dec), s_dec))
    return np.asarray(out) * 1e3


_FEATURES = ("num_prefill_tokens", "prefill_attn_work", "num_decodes", "sum_decode_seq_lens")


def _select(c: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[mask] for k, v in c.items()}


def fit_engine_steps(
    records,
    decode_threshold: int = 95,
    held_out: float = 0.2,
    seed: int = 0,
    fallback: FittedCoefficients | None = None,
) -> EngineStepFit:
    """The latency model of the steps an engine recorded (`engine.step_log`).

    * **overhead**: the median host part of a step (duration − executor time), a constant
      every step pays;
    * **per kind** (prefill-only, decode-only, chunked prefill's mixed steps): the form of
      `latency_model` fitted on each distinct shape's median step, then scaled to the mean;
      mixed steps are fitted only when there are enough of them;
    * **held-out error**: the fit is repeated without a random ``held_out`` share of each
      kind's shapes and judged on their steps (shapes it never saw);
    * **decode batch factors**: the decode form's measured/predicted ratio (time-weighted)
      per batch-size bucket [1], [2, 3], [4, 7], ... with at least `MIN_BUCKET_STEPS`
      steps (a sparser bucket keeps the smaller one's factor), as
      ``FittedCoefficients.decode_batch_factors``;
    * **noise**: measured/predicted per step of each kind (`StepTimeNoise`, mean 1);
    * **fallback** (optional, e.g. a closed-loop profile's): the coefficients of a group with
      too few distinct shapes to fit its form (chunked prefill served at a rate runs almost
      no prefill-only steps), scaled to the mean of its steps (`EngineStepFit.borrowed`).
      Without one, too few prefill- or decode-only shapes is an error.
    """
    if not 0 <= held_out < 1:
        raise ValueError(f"held_out must be a fraction in [0, 1), got {held_out!r}")
    c = _step_table(records)
    if c["ms"].size == 0 or np.any(c["ms"] <= 0):
        raise ValueError("engine step fit: needs recorded steps with durations > 0")
    overhead = max(float(np.median(c["host_ms"])), 0.0)
    masks = _kind_masks(c)
    fits, borrowed = _fit_kinds(c, masks, overhead, decode_threshold, fallback)
    co = _with_batch_factors(_coefficients(fits, overhead, decode_threshold), c, masks["decode"])
    rng = np.random.default_rng(seed)
    test = np.zeros(c["ms"].size, dtype=bool)
    for kind, mask in masks.items():
        test |= _split(mask, _design(kind, c), rng, held_out)
    train = _select(c, ~test)
    train_masks = _kind_masks(train)
    train_fits, _ = _fit_kinds(train, train_masks, overhead, decode_threshold, fallback)
    train_co = _with_batch_factors(
        _coefficients(train_fits, overhead, decode_threshold), train, train_masks["decode"]
    )
    return dataclasses.replace(_judge(co, train_co, c, masks, test), borrowed=borrowed)


MIN_BUCKET_STEPS = 20
"""Decode steps a batch-size bucket needs for its own factor (`fit_engine_steps`)."""


def _with_batch_factors(
    co: FittedCoefficients, c: dict[str, np.ndarray], decode: np.ndarray
) -> FittedCoefficients:
    """``co`` with the decode form's residual per batch-size bucket (powers of two) of the
    decode-only steps ``decode``: what the affine form misses by batch size, measured."""
    if not decode.any():
        return co
    sel = _select(c, decode)
    predicted = _predict_ms(co, "decode", sel)
    batch = sel["num_decodes"].astype(np.int64)
    rows, size = [], 1
    while size <= batch.max():
        bucket = (batch >= size) & (batch < 2 * size)
        if bucket.sum() >= MIN_BUCKET_STEPS:
            rows.append((size, float(sel["ms"][bucket].sum() / predicted[bucket].sum())))
        size *= 2
    return dataclasses.replace(co, decode_batch_factors=tuple(rows))


def _judge(co, train_co, c, masks, test) -> EngineStepFit:
    """Errors (in-sample with ``co``, held out with ``train_co``) and noise of the fit."""
    fit_error, held_out_error, noise = {}, {}, {}
    # Every step's ratio in step order: the noise's autocorrelation is that of the sequence.
    all_ratios = np.full(c["ms"].size, np.nan)
    for kind, mask in masks.items():
        if not mask.any() or (kind == "mixed" and co.mixed is None):
            continue
        sel = _select(c, mask)
        ratio = sel["ms"] / _predict_ms(co, kind, sel)
        noise[kind] = StepTimeNoise.from_ratios(ratio)
        all_ratios[mask] = ratio
        rel = np.abs(1.0 / ratio - 1.0)
        if kind == "decode":
            small = sel["num_decodes"] < co.decode_threshold
            for name, part in (("decode_small", small), ("decode_large", ~small)):
                if part.any():
                    fit_error[name] = _error(rel[part])
        else:
            fit_error[kind] = _error(rel)
        if (test & mask).any() and not (kind == "mixed" and train_co.mixed is None):
            sel = _select(c, test & mask)
            held_out_error[kind] = _error(np.abs(_predict_ms(train_co, kind, sel) / sel["ms"] - 1))
    noise["all"] = StepTimeNoise.from_ratios(all_ratios[~np.isnan(all_ratios)])
    return EngineStepFit(co, fit_error, held_out_error, noise)
