"""The profiler: grid, measurement plumbing and fit with a fake timer; `drt-run profile` on a
tiny grid with the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from distserve_rt.entrypoints.cli import main
from distserve_rt.models.presets import get_preset
from distserve_rt.planner.latency_model import FittedLatencyModel
from distserve_rt.planner.profiler import MIN_LEN, ProfileGrid, fit_profile, measure
from distserve_rt.planner.profiles import load_profile

PREFILL = (2.0, 0.05, 1e-5)  # a, b, c (ms)
DECODE_SMALL = (1.0, 2e-4, 0.03)
DECODE_LARGE = (3.0, 1e-4, 0.01)


class FakeTimer:
    """Exact step times of known coefficients (ms), and a log of what was asked."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.calls: list[tuple[str, list[int]]] = []

    def prefill_ms(self, prompt_lens):
        self.calls.append(("prefill", list(prompt_lens)))
        a, b, c = PREFILL
        return a + b * sum(prompt_lens) + c * sum(n * n for n in prompt_lens)

    def decode_ms(self, ctx_lens):
        self.calls.append(("decode", list(ctx_lens)))
        a, b, c = DECODE_SMALL if len(ctx_lens) < self.threshold else DECODE_LARGE
        return a + b * sum(n + 1 for n in ctx_lens) + c * len(ctx_lens)


def test_grid_respects_budgets():
    grid = ProfileGrid(max_batch_size=12, max_tokens=512, max_context_len=300)
    assert grid.batch_sizes() == [1, 2, 4, 8, 12]
    prefill = grid.prefill_points()
    assert all(b * n <= 512 and b <= 12 and n >= MIN_LEN for b, n in prefill)
    assert (1, 512) in prefill and (12, 32) in prefill and (12, 64) not in prefill
    decode = grid.decode_points()
    assert {c for _, c in decode} == {16, 64, 256, 300}
    assert len(decode) == 4 * 5
    assert grid.max_kv_tokens == 12 * 301


@pytest.mark.parametrize(
    "kwargs",
    [{"max_batch_size": 0}, {"max_tokens": 8}, {"max_context_len": True}, {"decode_ctx_step": 1}],
)
def test_grid_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ProfileGrid(**kwargs)


def test_measure_and_fit_recover_coefficients():
    grid = ProfileGrid(max_batch_size=8, max_tokens=1024, max_context_len=512)
    timer = FakeTimer(threshold=4)
    wrapped = []
    samples = measure(grid, timer, progress=lambda pts: wrapped.append(len(pts)) or pts)
    # Every grid point once, prefill first, each a batch of equal lengths.
    num_prefill = len(grid.prefill_points())
    assert wrapped == [num_prefill + len(grid.decode_points())]
    assert [c[1] for c in timer.calls[:num_prefill]] == [[n] * b for b, n in grid.prefill_points()]
    assert {c[0] for c in timer.calls[num_prefill:]} == {"decode"}

    profile = fit_profile(samples, get_preset("llama-tiny"), hardware="fake", decode_threshold=4)
    entry = profile.entries[0]
    co = entry.coefficients
    assert co.prefill == pytest.approx(PREFILL, rel=1e-6)
    assert co.decode_small == pytest.approx(DECODE_SMALL, rel=1e-6)
    assert co.decode_large == pytest.approx(DECODE_LARGE, rel=1e-6)
    assert set(entry.fit_error) == {"prefill", "decode_small", "decode_large"}
    assert max(e.max_rel for e in entry.fit_error.values()) < 1e-9
    lm = FittedLatencyModel(co)
    assert lm.prefill_s(300, 300**2) * 1e3 == pytest.approx(timer.prefill_ms([300]))


def test_fit_error_reports_a_misfit():
    # Times the form cannot fit (a jump in the middle) must show up in the fit error.
    grid = ProfileGrid(max_batch_size=4, max_tokens=256, max_context_len=64)
    timer = FakeTimer(threshold=1000)
    samples = measure(grid, timer)
    samples.prefill = [(lens, t * (3.0 if sum(lens) == 64 else 1.0)) for lens, t in samples.prefill]
    profile = fit_profile(samples, get_preset("llama-tiny"), hardware="fake", analytic=True)
    assert profile.entries[0].fit_error["prefill"].max_rel > 0.3
    assert profile.entries[0].fit_error["decode_small"].max_rel < 1e-9
    assert set(profile.analytic_fit_error) == {"prefill", "decode"}


def test_drt_run_profile_tiny_grid(tmp_path, capsys):
    out = tmp_path / "p.json"
    argv = [
        "profile",
        "--isolated",
        "--max-batch-size=2",
        "--max-tokens=64",
        "--max-context-len=32",
        "--repeats=1",
        "--warmup=0",
        f"--output={out}",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "fit error prefill" in text and "saved" in text
    profile = load_profile(out)
    entry = profile.find("llama-tiny", 1)
    assert entry is not None and entry.fit_error["prefill"].num_samples == 5
    m = profile.measurement
    assert m["includes"] == ["prepare_inputs", "model", "sampler"]
    assert m["device"] == "cpu" and m["dtype"] == "float32"
    assert m["threads"] == torch.get_num_threads()
    assert len(m["samples"]["decode"]) == entry.fit_error["decode_small"].num_samples == 4
    assert all(r["ms"] > 0 for r in m["samples"]["prefill"] + m["samples"]["decode"])
    raw = json.loads(out.read_text())
    assert raw["units"] == "ms" and raw["hardware"] == profile.hardware != ""


ENGINE_ARGV = [
    "profile",
    "--num-steps=60",
    "--repeats=2",
    "--max-prompt-len=48",
    "--max-output-len=6",
    "--max-num-seqs=8",
    "--warmup-steps=2",
    "--kv-cache-memory-bytes=16MiB",
]


def test_drt_run_profile_fits_the_engine_steps(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main([*ENGINE_ARGV, f"--output={out}"]) == 0
    text = capsys.readouterr().out
    assert "held-out decode" in text and "step time / model" in text and "saved" in text
    profile = load_profile(out)
    entry = profile.find("llama-tiny", 1)
    assert entry.coefficients.overhead > 0
    assert {"prefill", "decode", "all"} <= set(entry.step_noise)
    assert {"prefill", "decode"} <= set(entry.held_out_error)
    m = profile.measurement
    assert m["mode"] == "engine" and m["policy"] == "chunked_prefill"
    assert m["includes"] == ["schedule", "execute", "postprocess"]
    assert (m["model"], m["dtype"], m["tp"], m["pp"]) == ("llama-tiny", "float32", 1, 1)
    assert m["hardware"] == profile.hardware != "" and m["threads"] == torch.get_num_threads()
    assert min(m["num_steps"]["prefill"], m["num_steps"]["decode"]) >= 6
    assert profile.step_noise("llama-tiny", 1) == entry.step_noise["all"]
    # The replayed noise is in the file, and the batch-size factors are shown when fitted
    # (this short workload may have fewer than MIN_BUCKET_STEPS per bucket).
    assert entry.step_noise["decode"].sequence and "replays" in text
    assert bool(entry.coefficients.decode_batch_factors) == ("decode x by batch size" in text)


def test_engine_workload_repeats_the_same_batches():
    """A repeat must execute the very same batch shapes (so a shape's median is over
    repeats): arrivals are per step, not per second."""
    from distserve_rt.benchmarks.engine_profile import EngineWorkload, record_engine_steps
    from distserve_rt.engine import EngineConfig, LLMEngine

    config = EngineConfig(
        max_num_seqs=8, kv_cache_memory_bytes=16 << 20, log_stats_interval_s=0,
        enable_prefix_caching=False,
    )  # fmt: skip
    engine = LLMEngine(config)
    workload = EngineWorkload(30, 40, 5, 16, seed=1)
    with pytest.raises(ValueError, match="enable_prefix_caching=True; build it with"):
        record_engine_steps(LLMEngine(config.replace(enable_prefix_caching=True)), workload)
    records = record_engine_steps(engine, workload, repeats=2, warmup_steps=0)
    shapes = [r.shape for r in records]
    half = len(shapes) // 2
    assert len(shapes) == 2 * half and shapes[:half] == shapes[half:]
    assert {s.kind for s in shapes} == {"prefill", "decode", "mixed"}
    assert engine.step_log is None  # recording ends with the workload


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--pp=2"], "--pp 2 is not supported: a pipelined engine overlaps 2 batches"),
        (["--isolated", "--tp=2"], "--isolated times one process and cannot run --tp 2"),
        (["--tp=0"], "--tp must be >= 1, got 0"),
    ],
)
def test_drt_run_profile_refuses_unsupported_parallelism(flags, message, capsys):
    assert main(["profile", *flags]) == 1  # one line, no traceback (cli.main)
    err = capsys.readouterr().err
    assert err.startswith(f"drt-run profile: {message}") and err.count("\n") == 1
