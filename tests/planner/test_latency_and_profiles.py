"""Latency-model forms, DistServe's shipped coefficients, and profile fits."""

from __future__ import annotations

import numpy as np
import pytest

from distserve_rt.models.presets import get_preset
from distserve_rt.planner.latency_model import (
    AnalyticCoefficients,
    AnalyticLatencyModel,
    FittedCoefficients,
    FittedLatencyModel,
)
from distserve_rt.planner.profile_fit import fit_fitted_form
from distserve_rt.planner.profiles import load_profile, profile_from_dict


def test_fitted_form_hand_computed():
    lm = FittedLatencyModel(
        FittedCoefficients((10, 0.1, 1e-5), (20, 0.001, 0.05), (5, 0.002, 0.2), 95)
    )
    # prefill: 10 + 0.1*300 + 1e-5*(100^2+200^2) = 10 + 30 + 0.5 ms
    assert lm.prefill_s(300, 100**2 + 200**2) == pytest.approx(40.5e-3)
    # small batch: 20 + 0.001*1000 + 0.05*10 ms; large: 5 + 0.002*5000 + 0.2*100
    assert lm.decode_s(10, 1000) == pytest.approx(21.5e-3)
    assert lm.decode_s(100, 5000) == pytest.approx(35e-3)


def test_analytic_form_hand_computed():
    model = get_preset("opt-tiny")  # h=256, m=1024, 4 layers
    co = AnalyticCoefficients(1e-9, 2e-9, 3.0, 4e-9, 5e-9, c6=0.0, attn_block_size=128)
    lm = AnalyticLatencyModel(co, model, tp=2)
    h, m, layers, t, t2 = 256, 1024, 4, 100, 100**2
    want = layers / 2 * (1e-9 * (4 * t * h * h + 2 * t * h * m) + 2e-9 * 3 * h * t2 / 128) + 3.0
    assert lm.prefill_s(t, t2) == pytest.approx(want * 1e-3)
    want = layers / 2 * (4e-9 * (4 * h * h + 2 * h * m) + 5e-9 * 3 * h * 500)
    assert lm.decode_s(7, 500) == pytest.approx(want * 1e-3)


def test_distserve_profile_loads_with_its_formula():
    prof = load_profile("a100-80g-distserve")
    lm = prof.latency_model(get_preset("opt-13b"), 1)
    # DistServe JSON, facebook/opt-13b tp 1 "prefill" and "decoding_smallbs"/"largebs".
    a, b, c = 18.10254647486372, 0.1019122572698738, 7.122264314252114e-06
    assert lm.prefill_s(512, 512**2) == pytest.approx((a + b * 512 + c * 512**2) * 1e-3)
    a, b, c = 19.934702624895458, 0.0006269356524350583, 0.03850697740828398
    assert lm.decode_s(8, 8 * 1001) == pytest.approx((a + b * 8 * 1001 + c * 8) * 1e-3)
    a, b, c = 7.1661889468253595, 0.0005798000403396046, 0.15831096191764046
    assert lm.decode_s(95, 95000) == pytest.approx((a + b * 95000 + c * 95) * 1e-3)
    assert {(e.model, e.tp) for e in prof.entries} >= {("opt-13b", 4), ("opt-66b", 8)}


def test_unprofiled_model_uses_analytic_form_fitted_on_same_hardware():
    prof = load_profile("a100-80g-distserve")
    lm = prof.latency_model(get_preset("opt-175b"), 8)
    assert isinstance(lm, AnalyticLatencyModel)
    assert prof.analytic_fit_error["prefill"].mean_rel < 0.2
    # Bigger model, same TP: slower than OPT-66B's fitted time.
    lm66 = prof.latency_model(get_preset("opt-66b"), 8)
    assert lm.prefill_s(1024, 1024**2) > lm66.prefill_s(1024, 1024**2)


def test_profile_round_trip_and_schema_check(tmp_path):
    prof = load_profile("a100-80g-vllm")
    prof.analytic_coefficients()
    path = prof.save(tmp_path / "p.json")
    again = load_profile(path)
    assert again.find("opt-66b", 3).coefficients == prof.find("opt-66b", 3).coefficients
    assert again.analytic == prof.analytic
    with pytest.raises(ValueError, match="schema_version"):
        profile_from_dict({"schema_version": 99})
    with pytest.raises(ValueError, match="neither a built-in"):
        load_profile(tmp_path / "missing.json")


def test_fit_recovers_known_coefficients_from_noisy_samples():
    rng = np.random.default_rng(0)
    true = FittedLatencyModel(
        FittedCoefficients((15, 0.08, 4e-6), (12, 4e-4, 0.06), (9, 3e-4, 0.09))
    )
    prefill, decode = [], []
    for _ in range(60):
        lens = rng.integers(16, 2048, rng.integers(1, 5))
        t = true.prefill_s(int(lens.sum()), int((lens**2).sum())) * 1e3
        prefill.append((lens, t * (1 + rng.normal(0, 0.01))))
    for _ in range(120):
        ctx = rng.integers(16, 2048, rng.integers(1, 200))
        t = true.decode_s(ctx.size, int((ctx + 1).sum())) * 1e3
        decode.append((ctx, t * (1 + rng.normal(0, 0.01))))
    co, err = fit_fitted_form(prefill, decode)
    np.testing.assert_allclose(co.prefill, (15, 0.08, 4e-6), rtol=0.1)
    np.testing.assert_allclose(co.decode_small, (12, 4e-4, 0.06), rtol=0.15)
    np.testing.assert_allclose(co.decode_large, (9, 3e-4, 0.09), rtol=0.15)
    assert err["prefill"].mean_rel < 0.02 and err["decode_large"].max_rel < 0.05
    with pytest.raises(ValueError, match="cannot fit"):
        fit_fitted_form(prefill[:2], decode)


def test_a_model_the_profile_never_measured_is_said_to_be_extrapolated(caplog):
    profile = load_profile("a100-80g-distserve")
    measured = profile.latency_model(get_preset("opt-13b"), 1)
    assert not profile.extrapolated and measured is not None
    with caplog.at_level("WARNING"):
        for tp in (2, 4):
            profile.latency_model(get_preset("llama-3-70b"), tp)
            profile.latency_model(get_preset("llama-3-70b"), tp)
    assert set(profile.extrapolated) == {("llama-3-70b", 2), ("llama-3-70b", 4)}
    note = profile.extrapolated[("llama-3-70b", 4)]
    assert "no measurement of llama-3-70b at tp=4" in note and "opt-66b tp=8" in note
    assert "mean error on them is" in note and "drt-run profile" in note
    warnings = [r for r in caplog.records if "llama-3-70b" in r.getMessage()]
    assert len(warnings) == 1  # once per model, not per tp or per call


def test_overhead_and_fitted_mixed_form_hand_computed():
    co = FittedCoefficients(
        (10, 0.1, 1e-5), (20, 0.001, 0.05), (20, 0.001, 0.05), 95, 0.5, (3, 0.2, 1e-5, 0.002)
    )
    lm = FittedLatencyModel(co)
    assert lm.prefill_s(300, 50_000) == pytest.approx((0.5 + 10 + 30 + 0.5) * 1e-3)
    assert lm.decode_s(10, 1000) == pytest.approx((0.5 + 21.5) * 1e-3)
    # mixed: 0.5 + 3 + 0.2*(100 + 4) + 1e-5*20_000 + 0.002*800 ms
    assert lm.mixed_s(100, 20_000, 4, 800) == pytest.approx((0.5 + 3 + 20.8 + 0.2 + 1.6) * 1e-3)
    # a "mixed" step without decodes or without prefill is the plain form (one overhead)
    assert lm.mixed_s(300, 50_000, 0, 0) == lm.prefill_s(300, 50_000)
    assert lm.mixed_s(0, 0, 10, 1000) == lm.decode_s(10, 1000)
    with pytest.raises(ValueError, match="overhead must be a number of ms >= 0, got -1"):
        FittedCoefficients((1, 0, 0), (1, 0, 0), (1, 0, 0), overhead=-1)
    with pytest.raises(ValueError, match=r"mixed must be four numbers \[a, b, c, d\]"):
        FittedCoefficients((1, 0, 0), (1, 0, 0), (1, 0, 0), mixed=(1, 2))


def test_decode_batch_factors_scale_a_decode_step_by_its_batch_size():
    base = FittedCoefficients((10, 0.1, 0), (20, 0.001, 0.05), (20, 0.001, 0.05), 95, 0.5)
    co = FittedCoefficients(
        base.prefill, base.decode_small, base.decode_large, 95, 0.5,
        decode_batch_factors=[[2, 1.1], [16, 0.8]],
    )  # fmt: skip
    plain, lm = FittedLatencyModel(base), FittedLatencyModel(co)
    assert lm.decode_s(1, 100) == plain.decode_s(1, 100)  # below the first row: the form
    assert lm.decode_s(3, 300) == pytest.approx(1.1 * plain.decode_s(3, 300))
    assert lm.decode_s(15, 1500) == pytest.approx(1.1 * plain.decode_s(15, 1500))
    assert lm.decode_s(40, 4000) == pytest.approx(0.8 * plain.decode_s(40, 4000))
    assert lm.prefill_s(300, 50_000) == plain.prefill_s(300, 50_000)  # decode steps only
    again = FittedCoefficients(**co.to_dict())
    assert again == co and again.decode_batch_factors == ((2, 1.1), (16, 0.8))
    assert "decode_batch_factors" not in base.to_dict()
    with pytest.raises(
        ValueError, match="batch sizes must be ascending ints >= 1, got \\[16, 2\\]"
    ):
        FittedCoefficients((1, 0, 0), (1, 0, 0), (1, 0, 0), decode_batch_factors=[(16, 1), (2, 1)])
    with pytest.raises(ValueError, match="factors must be finite and > 0"):
        FittedCoefficients((1, 0, 0), (1, 0, 0), (1, 0, 0), decode_batch_factors=[(1, 0.0)])


def _engine_profile():
    from distserve_rt.planner.profile_fit import FitError
    from distserve_rt.planner.profiles import ProfileEntry, ProfileSet
    from distserve_rt.planner.step_noise import StepTimeNoise

    co = FittedCoefficients((1, 0.01, 0), (1, 0.001, 0.01), (1, 0.001, 0.01), 95, 0.2, (1, 0, 0, 0))
    noise = StepTimeNoise.from_ratios(np.linspace(0.7, 1.5, 50))
    entry = ProfileEntry(
        "llama-tiny",
        1,
        co,
        {"prefill": FitError(0.01, 0.05, 10, 0.03)},
        {"decode": FitError(0.02, 0.09, 8, 0.06)},
        {"decode": StepTimeNoise(noise.quantiles, 0.6), "all": noise},
    )
    measurement = {"hardware": "Intel Xeon", "model": "llama-tiny", "dtype": "float32", "tp": 1}
    return ProfileSet("Intel Xeon", [entry], "test", measurement=measurement)


def test_engine_profile_round_trips_and_gives_back_its_noise(tmp_path):
    import json

    profile = _engine_profile()
    again = load_profile(profile.save(tmp_path / "p.json"))
    assert json.loads((tmp_path / "p.json").read_text())["schema_version"] == 2
    assert again.entries == profile.entries and again.measurement == profile.measurement
    noise = again.step_noise("llama-tiny", 1)
    assert noise is not None and noise == profile.entries[0].step_noise["all"]
    assert len(noise.sequence) == 50  # the replayed steps survive the file
    decode = again.step_noise(get_preset("llama-tiny"), 1, "decode")
    assert decode.quantiles == noise.quantiles and decode.autocorrelation == 0.6
    assert again.step_noise("llama-tiny", 1, "mixed") is None
    by_kind = again.step_noise_by_kind("llama-tiny", 1)
    assert by_kind.for_kind("decode") == decode and by_kind.for_kind("mixed") == noise
    assert load_profile("a100-80g-distserve").step_noise_by_kind("opt-13b", 1) is None
    assert again.step_noise("opt-13b", 1) is None
    assert load_profile("a100-80g-distserve").step_noise("opt-13b", 1) is None


def test_version_1_files_still_load(tmp_path):
    v1 = {
        "schema_version": 1,
        "hardware": "cpu",
        "units": "ms",
        "entries": [
            {
                "model": "llama-tiny",
                "tp": 1,
                "form": "fitted",
                "coefficients": {
                    "prefill": [1, 2, 3],
                    "decode_small": [4, 5, 6],
                    "decode_large": [4, 5, 6],
                    "decode_threshold": 95,
                },
                "fit_error": {"prefill": {"mean_rel": 0.1, "max_rel": 0.2, "num_samples": 5}},
            }
        ],
    }
    profile = profile_from_dict(v1)
    entry = profile.find("llama-tiny", 1)
    assert entry.coefficients.overhead == 0 and entry.coefficients.mixed is None
    assert entry.fit_error["prefill"].p90_rel is None and not entry.step_noise


def test_use_on_another_dtype_or_hardware_is_said_loudly_once(caplog):
    profile = _engine_profile()
    model = get_preset("llama-tiny")
    with caplog.at_level("WARNING"):
        profile.latency_model(model, 1, dtype="float32", hardware="Intel Xeon")
        assert not profile.mismatches
        for _ in range(3):
            profile.latency_model(model, 1, dtype="bfloat16", hardware="NVIDIA H100")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2  # dtype and hardware, once each
    assert any("measured with dtype 'float32'" in w and "'bfloat16'" in w for w in warnings)
    assert any("'Intel Xeon'" in w and "'NVIDIA H100'" in w for w in warnings)
    # DistServe's A100 profile matches the full GPU name; it was measured in float16.
    distserve = load_profile("a100-80g-distserve")
    assert distserve.check_use(hardware="NVIDIA A100-SXM4-80GB", dtype="float16") == []
    assert distserve.check_use(hardware="NVIDIA H100 80GB HBM3") != []
