"""`drt-run plan --plot`: attainment vs rate of the top deployments (both kinds) with the
setup in the title, and the chosen deployment's latency breakdown."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import numpy as np

from distserve_rt.entrypoints.cli import main
from distserve_rt.planner.plot import plot_plan


def test_plot_plan_writes_two_non_trivial_panels(tmp_path):
    curves = {"colocated tp1pp1": [(1.0, 1.0, 0.01), (2.0, 0.8, 0.05)], "P + D": [(1.0, 1.0)]}
    breakdown = {"prefill_queue": 0.01, "prefill": 0.05, "transfer": 0.002, "decode": 1.2}
    path = plot_plan(curves, 0.9, breakdown, "1 x colocated", "opt-13b, chat", tmp_path / "p.png")
    image = mpimg.imread(path)
    assert image.shape[1] > 1.8 * image.shape[0]  # two panels side by side
    # Not a blank canvas: many distinct colours (lines, bars, text).
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 50


def test_plan_cli_plot_shows_both_kinds_and_the_breakdown(tmp_path, capsys, monkeypatch):
    seen = {}
    import distserve_rt.planner.plot as plot

    real = plot.plot_plan

    def spy(curves, target, breakdown, chosen, title, path):
        seen.update(curves=curves, breakdown=breakdown, chosen=chosen, title=title)
        return real(curves, target, breakdown, chosen, title, path)

    monkeypatch.setattr(plot, "plot_plan", spy)
    args = ["plan", "--model", "opt-13b", "--rate", "3", "--num-requests", "120"]
    args += ["--max-requests", "1000", "--output", "", "--json", "--plot", str(tmp_path / "a.png")]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert (tmp_path / "a.png").stat().st_size > 10_000 and out["plot"] == str(tmp_path / "a.png")
    labels = list(seen["curves"])
    assert 3 <= len(labels) <= 5
    assert any(x.startswith("colocated") for x in labels)
    assert any(x.startswith("P ") for x in labels)
    assert all(len(points) >= 5 for points in seen["curves"].values())
    assert "opt-13b" in seen["title"] and "TTFT 250 ms" in seen["title"]
    assert "1 x 8 devices" in seen["title"] and "3 req/s" in seen["title"]
    assert seen["breakdown"]["prefill"] > 0 and seen["breakdown"]["decode"] > 0
