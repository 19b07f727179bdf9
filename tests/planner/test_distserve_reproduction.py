"""`drt-run simulate --modelling distserve` reproduces DistServe's own simulator.

The references in ``data/distserve_reference/`` are DistServe's simulator's TTFT/TPOT
percentiles on fixed requests and arrivals (provenance and how to regenerate: its README).
With its modelling choices the two simulators are the same model, so they agree per
request to ~1e-10 ms (float summation order); the tolerance, 1e-6 relative, leaves room
for that and nothing else. The sensitivity tests show the references pin each modelling
choice: changing one moves a percentile by far more than the tolerance.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from distserve_rt.config.parallelism import Parallelism
from distserve_rt.entrypoints.cli import main
from distserve_rt.models.presets import get_preset
from distserve_rt.planner.distserve_modelling import (
    DISTSERVE_STEP_OVERHEAD,
    PrefillStageConstant,
    distserve_colocated_spec,
    distserve_disagg_spec,
    from_distserve_output_lens,
)
from distserve_rt.planner.latency_model import LatencyModel
from distserve_rt.planner.profiles import load_profile
from distserve_rt.planner.simulator import (
    DisaggregatedSimulator,
    KVTransferSpec,
    SimInstanceSpec,
    StepOverhead,
)
from distserve_rt.workloads.length_file import load_length_file

DATA = Path(__file__).parent / "data" / "distserve_reference"
REFERENCES = sorted(p.stem for p in DATA.glob("*.json"))
REL_TOL = 1e-6
KEYS = ("p50", "p90", "p99", "mean")


def _reference(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


def _simulate_cli(capsys, ref: dict, *extra: str) -> dict:
    argv = [
        "simulate",
        *ref["simulate_args"],
        "--modelling",
        "distserve",
        "--dataset-path",
        str(DATA / ref["requests"]),
        "--use-arrivals",
        "--json",
        *extra,
    ]
    assert main(argv) == 0
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    return run


def _ms(summary_s: dict) -> dict:
    return {k: summary_s[k] * 1e3 for k in KEYS}


def test_references_cover_disaggregated_pp_and_colocated():
    assert len(REFERENCES) >= 3
    placements = {tuple(_reference(n)["simulate_args"]) for n in REFERENCES}
    assert any("colocated" in a for a in placements)
    assert any("--prefill-pp" in a and a[a.index("--prefill-pp") + 1] == "2" for a in placements)


@pytest.mark.parametrize("name", REFERENCES)
def test_simulate_reproduces_distserve_percentiles(capsys, name):
    ref = _reference(name)
    # Its 50k-token decode cap is not modelled: a reference that hit it could not be matched.
    assert ref["decode_cap_hits"] == 0
    run = _simulate_cli(capsys, ref)
    assert run["num_requests"] == ref["workload"]["num_requests"]
    for metric in ("ttft", "tpot"):
        got, want = _ms(run[f"{metric}_s"]), ref[f"{metric}_ms"]
        for key in KEYS:
            assert got[key] == pytest.approx(want[key], rel=REL_TOL), (metric, key, got, want)


# ---- the references pin each modelling choice ---------------------------------------------


def _requests(name: str):
    trace = load_length_file(str(DATA / _reference(name)["requests"]))
    return trace.arrival_s, trace.prompt_lens, trace.output_lens


def _percentiles_ms(result) -> dict:
    out = {}
    for metric, values in (("ttft", result.ttft), ("tpot", result.tpot)):
        values = values * 1e3
        p = np.percentile(values, [50, 90, 99])
        out[metric] = {"p50": p[0], "p90": p[1], "p99": p[2], "mean": values.mean()}
    return out


def _largest_rel_gap(name: str, spec) -> float:
    ref = _reference(name)
    got = _percentiles_ms(DisaggregatedSimulator(spec).run(*_requests(name)))
    return max(abs(got[m][k] / ref[f"{m}_ms"][k] - 1) for m in ("ttft", "tpot") for k in KEYS)


def _pp2_spec():
    model, profile = get_preset("opt-13b"), load_profile("a100-80g-distserve")
    return distserve_disagg_spec(model, profile, Parallelism(1, 2), Parallelism(2, 1))


PP2 = "disagg_p1pp2_d2_sharegpt_rate2.5"


def test_the_spec_the_changes_start_from_matches():
    assert _largest_rel_gap(PP2, _pp2_spec()) < REL_TOL


def _replace_prefill(spec, **changes):
    return dataclasses.replace(spec, prefill=dataclasses.replace(spec.prefill, **changes))


@pytest.mark.parametrize(
    "change",
    [
        "no_pp_constant",
        "overhead_on_every_stage",
        "no_step_overhead",
        "prefill_budget_512",
        "kv_transfer_costs",
    ],
)
def test_reference_detects_a_changed_modelling_choice(change):
    spec = _pp2_spec()
    if change == "no_pp_constant":  # stages of t/pp instead of DistServe's t/pp + pp ms
        spec = _replace_prefill(spec, latency=spec.prefill.latency.inner)
    elif change == "overhead_on_every_stage":  # split evenly, as a plain latency term would be
        base_s = DISTSERVE_STEP_OVERHEAD.base_s
        spec = _replace_prefill(
            spec,
            latency=_WithPrefillConstant(spec.prefill.latency, base_s),
            step_overhead=dataclasses.replace(DISTSERVE_STEP_OVERHEAD, base_s=0.0),
        )
    elif change == "no_step_overhead":
        spec = _replace_prefill(spec, step_overhead=StepOverhead())
        spec = dataclasses.replace(
            spec, decode=dataclasses.replace(spec.decode, step_overhead=StepOverhead())
        )
    elif change == "prefill_budget_512":  # our default L_m
        spec = _replace_prefill(spec, max_batch_tokens=512)
    else:  # 5 ms + 10 us/token instead of free
        spec = dataclasses.replace(spec, kv_transfer=KVTransferSpec(1e-5, 5e-3))
    # Each change moves some percentile by >= 1.2% (seen: 1.2% to 25%), >> REL_TOL.
    assert _largest_rel_gap(PP2, spec) > 0.005


@dataclasses.dataclass(frozen=True)
class _WithPrefillConstant(LatencyModel):
    """``inner`` plus a constant on every prefill (split over the stages by the simulator)."""

    inner: LatencyModel
    extra_s: float

    @property
    def tp(self) -> int:
        return self.inner.tp

    def prefill_s(self, num_tokens: int, sum_sq_lens: int) -> float:
        return self.inner.prefill_s(num_tokens, sum_sq_lens) + self.extra_s

    def decode_affine(self, batch_size: int) -> tuple[float, float]:
        return self.inner.decode_affine(batch_size)


# ---- the modelling module's own contract ---------------------------------------------------


def test_prefill_stage_constant_is_pp_squared_ms():
    inner = load_profile("a100-80g-distserve").latency_model(get_preset("opt-13b"), 1)
    lat = PrefillStageConstant(inner, 2)
    assert lat.prefill_s(100, 10_000) == pytest.approx(inner.prefill_s(100, 10_000) + 4e-3)
    assert lat.decode_affine(8) == inner.decode_affine(8)
    assert lat.tp == 1
    with pytest.raises(ValueError, match="pp must be a positive int, got 0"):
        PrefillStageConstant(inner, 0)


def test_step_overhead_decode_counts_context_before_the_step():
    overhead = StepOverhead(2e-3, 1e-7)
    alpha, beta = overhead.decode_affine(4, 0.0, 0.0)
    # 4 requests holding Σ(ctx+1) = 1004 tokens hold Σctx = 1000 before the step.
    assert alpha + beta * 1004 == pytest.approx(overhead.seconds(1000))
    with pytest.raises(ValueError, match="step overhead must be >= 0"):
        StepOverhead(-1.0)


def test_spec_refuses_a_non_overhead():
    spec = _pp2_spec().prefill
    with pytest.raises(ValueError, match="step_overhead must be a StepOverhead, got 2"):
        SimInstanceSpec(spec.latency, 10, step_overhead=2)


def test_instances_outside_distserve_table_are_refused():
    model, profile = get_preset("opt-13b"), load_profile("a100-80g-vllm")
    with pytest.raises(ValueError, match="no capacity for opt-13b at tp=3, pp=1"):
        distserve_colocated_spec(model, profile, Parallelism(3, 1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decode": Parallelism(1, 2)}, "decode pp_size must be 1 .* got 2"),
        ({"num_prefill": 2}, "num_prefill must be 1 .* got 2"),
        ({"num_decode": 3}, "num_decode must be 1 .* got 3"),
    ],
)
def test_what_distserve_models_differently_is_refused(kwargs, message):
    model, profile = get_preset("opt-13b"), load_profile("a100-80g-distserve")
    args = {"prefill": Parallelism(1, 1), "decode": Parallelism(1, 1), **kwargs}
    with pytest.raises(ValueError, match=message):
        distserve_disagg_spec(model, profile, **args)


def test_simulate_cli_says_what_it_refuses(capsys):
    ref = _reference(PP2)
    with pytest.raises(SystemExit, match="drt-run simulate: decode pp_size must be 1"):
        _simulate_cli(capsys, ref, "--decode-pp", "2")


def test_simulate_cli_refuses_chunked_prefill_with_distserve_modelling(capsys):
    ref = _reference("colocated_vllm_tp1_sharegpt_rate1")
    with pytest.raises(SystemExit, match="--policy must be continuous_batching .* chunked"):
        _simulate_cli(capsys, ref, "--policy", "chunked_prefill")


def test_output_lens_convert_from_decode_steps():
    assert from_distserve_output_lens([0, 5]).tolist() == [1, 6]
    with pytest.raises(ValueError, match="output_lens must be >= 0"):
        from_distserve_output_lens([-1])
