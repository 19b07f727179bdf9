"""The main job's report (`drt-run bench --compare`, what `make run` runs): the plan printed
first, the verdict computed from canned sweep results, the PNG, the attainment columns."""

from __future__ import annotations

import argparse
import math

from distserve_rt.benchmarks.serving.compare import CompareEntry
from distserve_rt.entrypoints import engine_args
from distserve_rt.entrypoints.bench_report import describe_plan, plot_compare, verdict
from distserve_rt.entrypoints.cli import main
from distserve_rt.workloads import Workload
from tests.benchmarks.fake_engine import FakeEngine


def sweep(label: str, points: dict[float, tuple[float, float]], target: float = 0.9) -> dict:
    """A sweep JSON as `sweep_json` writes it: ``points`` is {rate: (attainment, goodput)}."""
    runs = [
        {"request_rate": "inf" if math.isinf(r) else r, "attainment": {"joint": a},
         "request_goodput": g}
        for r, (a, g) in points.items()
    ]  # fmt: skip
    slo = {"ttft_ms": 70.0, "tpot_ms": 10.0, "target": target}
    return {"label": label, "model_id": "dummy:llama-tiny", "slo": slo, "runs": runs}


def test_verdict_names_the_setup_meeting_the_slos_at_the_highest_rate():
    sweeps = [
        sweep("disaggregated", {5: (0.97, 4.8), 10: (0.93, 9.3)}),
        sweep("colocated:chunked_prefill", {5: (0.95, 4.7), 10: (0.43, 4.4)}),
    ]
    assert verdict(sweeps) == (
        "disaggregated meets the SLOs at 10 req/s with 93% attainment (target 90%), goodput "
        "9.30 req/s, vs colocated:chunked_prefill 43% (4.40 req/s): 2.11x the goodput"
    )


def test_verdict_breaks_a_tie_at_the_same_rate_by_attainment_then_goodput():
    sweeps = [
        sweep("a", {10: (0.92, 5.28)}),
        sweep("b", {10: (0.92, 5.45)}),
        sweep("c", {10: (0.5, 3.0)}),
    ]
    line = verdict(sweeps)
    assert line.startswith("b meets the SLOs at 10 req/s with 92% attainment")
    assert line.endswith("vs a 92% (5.28 req/s), c 50% (3.00 req/s): 1.03x the goodput")


def test_verdict_when_no_setup_meets_the_slos_names_the_closest():
    sweeps = [sweep("a", {5: (0.5, 2.0), 10: (0.2, 1.0)}), sweep("b", {5: (0.8, 3.0)})]
    assert verdict(sweeps) == (
        "no setup meets the SLOs (90% attainment) at any rate run; closest: b with 80% at "
        "5 req/s vs a 50% (2.00 req/s)"
    )


def test_verdict_of_a_single_setup_and_of_others_without_goodput():
    assert verdict([sweep("a", {5: (1.0, 5.0), math.inf: (1.0, 9.0)})]) == (
        "a meets the SLOs at 5 req/s with 100% attainment (target 90%), goodput 5.00 req/s"
    )
    line = verdict([sweep("a", {5: (0.95, 4.0)}), sweep("b", {5: (0.0, 0.0)})])
    assert line.endswith("vs b 0% (0.00 req/s): no goodput there")


def test_plot_compare_writes_a_png(tmp_path):
    sweeps = [sweep("disaggregated", {5: (0.97, 4.8), 10: (0.93, 9.3)})]
    sweeps.append(sweep("colocated", {5: (0.95, 4.7), 10: (0.43, 4.4)}))
    path = plot_compare(sweeps, tmp_path / "out" / "job.png")
    assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 5000


def test_describe_plan_says_model_device_setups_rates_slos_and_requests():
    args = argparse.Namespace(
        compare=[CompareEntry.parse("disaggregated"), CompareEntry.parse("colocated")],
        base_url=None, model=None, device=None, request_rate=[5.0, 10.0],
        attainment_target=0.9,
    )  # fmt: skip
    workload = Workload.from_dataset("chat").sample(60, seed=0).scaled(0.125)
    lines = describe_plan(args, workload, (70.0, 10.0)).splitlines()
    assert lines[0] == "drt-run bench: dummy:llama-tiny on cpu"
    assert lines[1] == "  setups:   disaggregated, colocated"
    assert lines[2].startswith("  rates:    5, 10 req/s, 60 requests each (")
    assert lines[3].startswith("  SLOs:     TTFT 70 ms, TPOT 10 ms; a setup meets them at a")


def test_compare_prints_plan_attainment_columns_verdict_and_png(monkeypatch, tmp_path, capsys):
    def build(args, *, placement=None, policy=None):
        # The disaggregated fake misses the 30 ms TTFT; the colocated one meets it.
        return FakeEngine(ttft_s=0.05 if placement.is_disaggregated else 0.002)

    monkeypatch.setattr(engine_args, "build_engine_client", build)
    argv = ["bench", "--dataset-name", "random", "--num-prompts", "4", "--random-input-len"]
    argv += ["8", "--random-output-len", "3", "--disable-tqdm", "--slo-ttft-ms", "30"]
    argv += ["--slo-tpot-ms", "500", "--request-rate", "100", "200", "--result-dir"]
    argv += [str(tmp_path), "--compare", "colocated", "disaggregated"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("drt-run bench: dummy:llama-tiny on cpu\n  setups:   colocated, ")
    header = "    rate SLO att. TTFT att. TPOT att.  goodput slo scale"
    assert out.count(header) == 2
    assert "\nVerdict: colocated meets the SLOs at 200 req/s with 100% attainment" in out
    png = tmp_path / "compare-fake-model.png"
    assert f"saved {png}\n" in out and png.stat().st_size > 5000


def test_compare_at_infinite_rate_only_writes_no_png(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(engine_args, "build_engine_client", lambda args, **kw: FakeEngine())
    argv = ["bench", "--dataset-name", "random", "--num-prompts", "2", "--random-input-len"]
    argv += ["8", "--random-output-len", "2", "--disable-tqdm", "--request-rate", "inf"]
    argv += ["--result-dir", str(tmp_path), "--compare", "colocated", "disaggregated"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Verdict" not in out and not list(tmp_path.iterdir())


def test_plot_flag_names_the_png(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(engine_args, "build_engine_client", lambda args, **kw: FakeEngine())
    target = tmp_path / "main-job.png"
    argv = ["bench", "--dataset-name", "random", "--num-prompts", "2", "--random-input-len"]
    argv += ["8", "--random-output-len", "2", "--disable-tqdm", "--request-rate", "50"]
    argv += ["--plot", str(target), "--compare", "colocated", "disaggregated"]
    assert main(argv) == 0
    assert f"saved {target}\n" in capsys.readouterr().out and target.stat().st_size > 0
