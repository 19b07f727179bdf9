"""Fits from the engine's steps (`profile_fit.fit_engine_steps`) and the step-time noise
(`step_noise.StepTimeNoise`), on synthetic steps with known coefficients and noise."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from distserve_rt.engine.step_log import StepRecord, StepShape
from distserve_rt.planner.latency_model import FittedCoefficients, FittedLatencyModel
from distserve_rt.planner.profile_fit import fit_engine_steps
from distserve_rt.planner.step_noise import (
    CORRELATION_BLOCK_STEPS,
    MAX_SEQUENCE_STEPS,
    NUM_QUANTILES,
    REPLAY_MEAN_BLOCK_STEPS,
    ReplayedDraws,
    StepTimeNoise,
    fit_autocorrelation,
)

TRUE = FittedCoefficients(
    prefill=(2.0, 0.01, 1e-5),
    decode_small=(1.0, 0.001, 0.05),
    decode_large=(1.0, 0.001, 0.05),
    overhead=0.5,
    mixed=(3.0, 0.012, 1.2e-5, 0.0015),
)
HOST_MS = 0.5


def _steps(num: int, sigma: float, seed: int = 0, rho: float = 0.0) -> list[StepRecord]:
    """Random prefill/decode/mixed steps timed by TRUE with lognormal execute noise, whose
    normal part follows an AR(1) process of coefficient ``rho`` from step to step."""
    rng = np.random.default_rng(seed)
    lm, out = FittedLatencyModel(TRUE), []
    z = rng.standard_normal()
    for i in range(num):
        z = rho * z + np.sqrt(1 - rho**2) * rng.standard_normal()
        kind = ("prefill", "decode", "mixed")[i % 3]
        chunks = [(int(n), int(rng.integers(0, 64))) for n in rng.integers(8, 256, 1 + i % 4)]
        if kind == "decode":
            chunks = []
        if kind == "prefill":
            chunks = [(n, 0) for n, _ in chunks]
        seq_lens = [] if kind == "prefill" else rng.integers(16, 512, rng.integers(1, 32))
        shape = StepShape(
            len(chunks),
            sum(n for n, _ in chunks),
            sum(n * (p + n) for n, p in chunks),
            len(seq_lens),
            int(np.sum(seq_lens)),
        )
        if kind == "prefill":
            exe = lm.prefill_s(shape.num_prefill_tokens, shape.prefill_attn_work)
        elif kind == "decode":
            exe = lm.decode_s(shape.num_decodes, shape.sum_decode_seq_lens)
        else:
            exe = lm.mixed_s(
                shape.num_prefill_tokens,
                shape.prefill_attn_work,
                shape.num_decodes,
                shape.sum_decode_seq_lens,
            )
        exe = (exe - HOST_MS * 1e-3) * np.exp(sigma * z - sigma**2 / 2)  # mean-1 noise
        out.append(StepRecord(shape, exe + HOST_MS * 1e-3, exe))
    return out


def _predict(co: FittedCoefficients, shape: StepShape) -> float:
    lm = FittedLatencyModel(co)
    return lm.mixed_s(
        shape.num_prefill_tokens,
        shape.prefill_attn_work,
        shape.num_decodes,
        shape.sum_decode_seq_lens,
    )


def test_fit_recovers_overhead_and_every_kind_including_mixed():
    steps = _steps(600, sigma=0.05)
    fit = fit_engine_steps(steps)
    co = fit.coefficients
    assert co.overhead == pytest.approx(HOST_MS, rel=1e-6)
    assert co.mixed is not None
    for step in _steps(90, sigma=0.0, seed=1):  # noise-free truth on unseen shapes
        assert _predict(co, step.shape) == pytest.approx(step.duration_s, rel=0.03)
    assert set(fit.fit_error) == {"prefill", "decode_small", "mixed"}
    assert set(fit.held_out_error) == {"prefill", "decode", "mixed"}
    for err in fit.held_out_error.values():
        assert 0 < err.mean_rel < 0.1 and err.mean_rel <= err.p90_rel <= err.max_rel
        assert err.num_samples >= 20  # 20% of ~200 steps of the kind


def test_held_out_error_exposes_a_form_that_does_not_fit():
    """Decode steps quadratic in the batch: the affine form cannot follow them, and the
    held-out error says so where the in-sample noise-free fit of the truth would not."""
    steps = []
    for record in _steps(600, sigma=0.0):
        s = record.shape
        if s.num_prefills == 0:
            extra = 0.02 * s.num_decodes**2 * 1e-3
            record = StepRecord(s, record.duration_s + extra, record.execute_s + extra)
        steps.append(record)
    fit = fit_engine_steps(steps)
    assert fit.held_out_error["decode"].max_rel > 0.1
    assert fit.held_out_error["prefill"].max_rel < 1e-6


def test_noise_reproduces_the_measured_spread_with_mean_one():
    steps = _steps(900, sigma=0.2)
    fit = fit_engine_steps(steps)
    rng = np.random.default_rng(0)
    for kind in ("prefill", "decode", "mixed", "all"):
        noise = fit.noise[kind]
        assert len(noise.quantiles) == NUM_QUANTILES
        draws = np.asarray([noise.sample(rng) for _ in range(4000)])
        assert noise.mean() == pytest.approx(1.0, abs=1e-12)
        assert draws.mean() == pytest.approx(1.0, abs=0.02)
    # The execute part scatters lognormally with sigma 0.2: p90/p10 ≈ exp(2·1.28·0.2) = 1.67.
    q = fit.noise["prefill"].quantiles
    assert q[18] / q[2] == pytest.approx(np.exp(2 * 1.2816 * 0.2), rel=0.15)


def test_step_time_noise_from_ratios_keeps_the_shape_of_the_input():
    ratios = np.random.default_rng(0).uniform(0.5, 1.5, 20000)
    noise = StepTimeNoise.from_ratios(ratios)
    q = np.asarray(noise.quantiles)
    expected = np.linspace(0.5, 1.5, NUM_QUANTILES)
    assert q == pytest.approx(expected, abs=0.02)  # uniform ratios already have mean 1
    rng = np.random.default_rng(1)
    draws = [noise.sample(rng) for _ in range(20000)]
    assert np.quantile(draws, [0.1, 0.5, 0.9]) == pytest.approx([0.6, 1.0, 1.4], abs=0.02)
    assert StepTimeNoise.none().sample(rng) == 1.0
    assert StepTimeNoise.from_ratios([2.0, 2.0]).quantiles == (1.0,) * NUM_QUANTILES


@pytest.mark.parametrize("quantiles", [(1.0,), (1.0, 0.5), (0.0, 1.0), ("a", 1.0)])
def test_step_time_noise_rejects_bad_tables(quantiles):
    with pytest.raises((ValueError, TypeError)):
        StepTimeNoise(quantiles)


@pytest.mark.parametrize("rho", [-0.1, 1.0, "0.5"])
def test_step_time_noise_rejects_bad_autocorrelation(rho):
    with pytest.raises(ValueError, match="autocorrelation must be in \\[0, 1\\)"):
        StepTimeNoise((0.5, 1.5), rho)


def _ar1(rho: float, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = np.empty(n)
    z[0] = rng.standard_normal()
    for i in range(1, n):
        z[i] = rho * z[i - 1] + np.sqrt(1 - rho**2) * rng.standard_normal()
    return z


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9, 0.97])
def test_autocorrelation_is_recovered_from_the_ratios_order(rho):
    ratios = np.exp(0.2 * _ar1(rho, 6000))
    noise = StepTimeNoise.from_ratios(ratios)
    assert noise.autocorrelation == pytest.approx(rho, abs=0.06)
    # The same ratios shuffled have the same table and no memory.
    shuffled = StepTimeNoise.from_ratios(np.random.default_rng(1).permutation(ratios))
    assert shuffled.quantiles == noise.quantiles and shuffled.autocorrelation < 0.1
    # Fewer than four blocks of steps: too few to tell, so independent.
    assert fit_autocorrelation(ratios[: 4 * CORRELATION_BLOCK_STEPS - 1]) == 0.0


def test_correlated_draws_keep_the_distribution_and_follow_each_other():
    quantiles = tuple(np.exp(np.linspace(-0.5, 0.5, NUM_QUANTILES)))
    rng = np.random.default_rng(0)
    independent = StepTimeNoise(quantiles)
    assert independent.process() is independent
    noise = StepTimeNoise(quantiles, 0.9)
    process = noise.process()
    draws = np.asarray([process.sample(rng) for _ in range(40000)])
    plain = np.asarray([noise.sample(rng) for _ in range(40000)])  # sample() stays independent
    assert np.quantile(draws, [0.1, 0.5, 0.9]) == pytest.approx(
        np.quantile(plain, [0.1, 0.5, 0.9]), rel=0.05
    )
    assert draws.mean() == pytest.approx(noise.mean(), rel=0.03)
    assert np.corrcoef(draws[:-1], draws[1:])[0, 1] == pytest.approx(0.9, abs=0.05)
    assert abs(np.corrcoef(plain[:-1], plain[1:])[0, 1]) < 0.05
    # Each process starts on its own: two instances' slow stretches are independent.
    other = noise.process()
    assert other is not process and other.z is None


def test_engine_fit_measures_the_noise_autocorrelation_in_step_order():
    slow_stretches = fit_engine_steps(_steps(1800, sigma=0.2, rho=0.9))
    assert slow_stretches.noise["all"].autocorrelation == pytest.approx(0.9, abs=0.08)
    # Each kind's own steps are every third step: rho^3 between consecutive ones.
    assert slow_stretches.noise["decode"].autocorrelation == pytest.approx(0.9**3, abs=0.12)
    independent = fit_engine_steps(_steps(1800, sigma=0.2))
    assert independent.noise["all"].autocorrelation < 0.15


def test_too_few_steps_of_a_kind_is_a_clear_error():
    steps = [s for s in _steps(300, 0.0) if s.shape.num_prefills]  # no decode-only steps
    with pytest.raises(ValueError, match="too few decode-only steps"):
        fit_engine_steps(steps)
    with pytest.raises(ValueError, match="held_out must be a fraction"):
        fit_engine_steps(_steps(300, 0.0), held_out=1.0)


def _without_prefill_only(steps: list[StepRecord], keep: int) -> list[StepRecord]:
    """``steps`` with only the first ``keep`` prefill-only steps (chunked prefill at load)."""
    out, kept = [], 0
    for s in steps:
        if s.shape.num_prefills and not s.shape.num_decodes:
            if kept == keep:
                continue
            kept += 1
        out.append(s)
    return out


def test_a_kind_with_too_few_shapes_borrows_the_fallback_scaled_to_its_steps():
    steps = _without_prefill_only(_steps(600, sigma=0.0), keep=3)
    with pytest.raises(ValueError, match="too few prefill-only steps"):
        fit_engine_steps(steps)
    # A fallback twice as slow on prefill: its form is kept, its level is the steps'.
    slow = FittedCoefficients(
        tuple(2 * c for c in TRUE.prefill), TRUE.decode_small, TRUE.decode_large,
        overhead=TRUE.overhead, mixed=TRUE.mixed,
    )  # fmt: skip
    fit = fit_engine_steps(steps, fallback=slow)
    assert fit.borrowed == ("prefill",)
    assert np.allclose(fit.coefficients.prefill, TRUE.prefill, rtol=0.02)
    # The kinds with enough shapes are fitted from the steps, not taken from the fallback.
    assert fit.coefficients.decode_small[0] == pytest.approx(TRUE.decode_small[0], rel=0.05)
    assert fit.coefficients.mixed[1] == pytest.approx(TRUE.mixed[1], rel=0.05)


def test_a_kind_without_steps_keeps_the_fallback_as_it_is():
    steps = _without_prefill_only(_steps(600, sigma=0.0), keep=0)
    slow = FittedCoefficients((4.0, 0.02, 2e-5), TRUE.decode_small, TRUE.decode_large)
    fit = fit_engine_steps(steps, fallback=slow)
    assert fit.borrowed == ("prefill",)
    assert fit.coefficients.prefill == slow.prefill
    assert "prefill" not in fit.noise  # no steps of it: no measured spread either
    # A fallback is not used where the steps fit: all kinds present, nothing borrowed.
    assert fit_engine_steps(_steps(600, sigma=0.0), fallback=slow).borrowed == ()
    # Mixed steps are optional (continuous batching runs none): none ran, none borrowed.
    no_mixed = [
        s for s in _steps(600, sigma=0.0) if not (s.shape.num_prefills and s.shape.num_decodes)
    ]
    fit = fit_engine_steps(no_mixed, fallback=TRUE)
    assert fit.borrowed == () and fit.coefficients.mixed is None


def _block_variance(x: np.ndarray, m: int) -> float:
    """Variance of the means of ``m`` consecutive values over that of independent ones."""
    n = x.size // m
    return m * float(x[: n * m].reshape(n, m).mean(axis=1).var()) / float(x.var())


def test_replay_keeps_the_measured_distribution_and_its_dependence_at_every_lag():
    # Isolated spikes on top of slow stretches: the shape one AR(1) cannot give both of.
    rng = np.random.default_rng(0)
    slow = np.exp(0.08 * _ar1(0.995, 4000))
    spikes = np.where(rng.random(4000) < 0.03, 2.5, 1.0)
    measured = slow * spikes
    noise = StepTimeNoise.from_ratios(measured)
    assert len(noise.sequence) == 4000
    assert np.mean(noise.sequence) == pytest.approx(1.0, abs=1e-3)
    process = noise.process()
    assert isinstance(process, ReplayedDraws) and noise.process() is not process
    draws = np.asarray([process.sample(rng) for _ in range(40000)])
    ref = np.asarray(noise.sequence)
    assert np.quantile(draws, [0.1, 0.5, 0.9, 0.99]) == pytest.approx(
        np.quantile(ref, [0.1, 0.5, 0.9, 0.99]), rel=0.03
    )
    # The spikes stay isolated (lag 1 as measured) and the stretches long (block variance
    # over 128 steps as measured, well above independent draws').
    lag1 = np.corrcoef(ref[:-1], ref[1:])[0, 1]
    assert np.corrcoef(draws[:-1], draws[1:])[0, 1] == pytest.approx(lag1, abs=0.05)
    assert _block_variance(draws, 128) == pytest.approx(_block_variance(ref, 128), rel=0.35)
    assert _block_variance(draws, 128) > 5
    # sample() stays independent draws from the table.
    plain = np.asarray([noise.sample(rng) for _ in range(20000)])
    assert abs(np.corrcoef(plain[:-1], plain[1:])[0, 1]) < 0.05


def test_replay_jumps_to_a_random_position_once_per_mean_block():
    sequence = tuple(float(i + 1) for i in range(1000))
    draws = ReplayedDraws(sequence, mean_block=50)
    rng = np.random.default_rng(3)
    values = np.asarray([draws.sample(rng) for _ in range(20000)])
    steps = np.diff(values)
    jumps = np.count_nonzero((steps != 1) & (steps != -999))  # -999: wrapped around
    assert jumps / values.size == pytest.approx(1 / 50, rel=0.15)
    with pytest.raises(ValueError, match="mean_block must be >= 1"):
        ReplayedDraws(sequence, mean_block=0)
    assert REPLAY_MEAN_BLOCK_STEPS > CORRELATION_BLOCK_STEPS


def test_only_the_first_steps_are_kept_and_bad_sequences_are_refused():
    noise = StepTimeNoise.from_ratios(np.exp(0.1 * _ar1(0.5, MAX_SEQUENCE_STEPS + 500)))
    assert len(noise.sequence) == MAX_SEQUENCE_STEPS
    with pytest.raises(ValueError, match="sequence must hold finite factors > 0, got 0.0"):
        StepTimeNoise((0.9, 1.1), sequence=(1.0, 0.0))
    # Without a sequence (a profile written before it) the AR(1) process stands in.
    assert StepTimeNoise((0.9, 1.1), 0.5).process().z is None


def test_the_fit_measures_what_the_decode_form_leaves_by_batch_size():
    # Decode steps of one request run 10% above the form, of 16 or more 20% below it (the
    # shape a CPU's GEMMs gave): the fit's factors per batch-size bucket recover both.
    def bias(batch: int) -> float:
        return 1.1 if batch == 1 else 0.8 if batch >= 16 else 1.0

    steps = []
    for s in _steps(3000, sigma=0.02):
        if s.shape.num_decodes and not s.shape.num_prefills:
            f = bias(s.shape.num_decodes)
            s = StepRecord(
                s.shape, HOST_MS * 1e-3 + (s.duration_s - HOST_MS * 1e-3) * f, s.execute_s * f
            )
        steps.append(s)
    fit = fit_engine_steps(steps)
    factors = dict(fit.coefficients.decode_batch_factors)
    form = FittedLatencyModel(replace(fit.coefficients, decode_batch_factors=()))
    corrected = FittedLatencyModel(fit.coefficients)
    decodes = [s for s in steps if s.shape.num_decodes and not s.shape.num_prefills]
    for low, high in ((1, 2), (2, 4), (4, 8), (8, 16), (16, 32)):
        bucket = [s for s in decodes if low <= s.shape.num_decodes < high]
        measured = sum(s.duration_s for s in bucket)

        def predicted(lm, bucket=bucket):
            return sum(
                lm.decode_s(s.shape.num_decodes, s.shape.sum_decode_seq_lens) for s in bucket
            )

        assert measured / predicted(corrected) == pytest.approx(1.0, abs=0.02), low
        if low in (1, 16):  # the form alone misses these buckets by the bias
            assert abs(measured / predicted(form) - 1) > 0.04, low
    assert set(factors) <= {1, 2, 4, 8, 16}
    # Without a bias there is little to correct: every factor is near 1.
    plain = dict(fit_engine_steps(_steps(3000, sigma=0.02)).coefficients.decode_batch_factors)
    assert all(f == pytest.approx(1.0, abs=0.05) for f in plain.values())
