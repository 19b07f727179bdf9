"""drt-run simulate --simulator: which simulator runs, its defaults, and its refusals."""

from __future__ import annotations

import json

import pytest

from distserve_rt.entrypoints.cli import main
from distserve_rt.planner.simulator import (
    ColocatedSimulator,
    DisaggregatedSimulator,
    SchedulerDrivenColocated,
    SchedulerDrivenDisaggregated,
)

FEW = ["--num-requests", "20", "--rates", "1", "--json"]


def _run(capsys, *flags: str) -> dict:
    assert main(["simulate", *FEW, *flags]) == 0
    return json.loads(capsys.readouterr().out)


def _ran(monkeypatch) -> list[str]:
    """Names of the simulator classes whose `run` was called."""
    seen: list[str] = []
    for cls in (
        ColocatedSimulator,
        DisaggregatedSimulator,
        SchedulerDrivenColocated,
        SchedulerDrivenDisaggregated,
    ):
        original = cls.run

        def spy(self, *a, _original=original, _name=cls.__name__, **kw):
            seen.append(_name)
            return _original(self, *a, **kw)

        monkeypatch.setattr(cls, "run", spy)
    return seen


@pytest.mark.parametrize(
    ("flags", "simulator", "cls"),
    [
        ([], "scheduler", "SchedulerDrivenDisaggregated"),
        (["--simulator", "fast"], "fast", "DisaggregatedSimulator"),
        (["--decode-pp", "2"], "fast", "DisaggregatedSimulator"),  # PP: only fast covers it
        (["--placement", "colocated"], "scheduler", "SchedulerDrivenColocated"),
        (["--placement", "colocated", "--simulator", "fast"], "fast", "ColocatedSimulator"),
    ],
)
def test_the_output_names_the_simulator_that_ran(capsys, monkeypatch, flags, simulator, cls):
    seen = _ran(monkeypatch)
    out = _run(capsys, *flags)
    assert out["simulator"] == simulator
    assert seen == [cls]


def test_the_table_states_the_simulator(capsys):
    assert main(["simulate", "--num-requests", "20", "--rates", "1"]) == 0
    assert "simulator: scheduler (the runtime's core schedulers" in capsys.readouterr().out


def test_scheduler_with_pp_is_refused_in_one_line():
    message = "drt-run simulate: --simulator scheduler supports pp=1 only, got --prefill-pp 2"
    with pytest.raises(SystemExit, match=message):
        main(["simulate", *FEW, "--simulator", "scheduler", "--prefill-pp", "2"])


def test_continuous_batching_budget_defaults_to_the_runtimes(capsys):
    # The runtime batches up to max(max_model_len, 2048) without chunking; 512 would refuse
    # every prompt longer than it.
    assert _run(capsys, "--placement", "colocated")["max_batch_tokens"] == 2048
    chunked = _run(capsys, "--placement", "colocated", "--policy", "chunked_prefill")
    assert chunked["max_batch_tokens"] == 512
    assert _run(capsys)["max_batch_tokens"] == 512  # the prefill instances' L_m


def test_continuous_batching_refuses_a_budget_below_the_longest_request():
    with pytest.raises(SystemExit, match=r"--max-batch-tokens 64 is below the longest request"):
        main(["simulate", *FEW, "--placement", "colocated", "--max-batch-tokens", "64"])


def _noisy_profile(tmp_path) -> str:
    """DistServe's A100 profile with a measured step-time spread for opt-13b tp1 (x0.5-x2)."""
    from dataclasses import replace

    from distserve_rt.planner.profiles import load_profile
    from distserve_rt.planner.step_noise import StepTimeNoise

    profile = load_profile("a100-80g-distserve")
    noise = StepTimeNoise.from_ratios([0.5, 0.8, 1.0, 1.0, 1.2, 2.0])
    profile.entries = [
        replace(e, step_noise={"all": noise}) if (e.model, e.tp) == ("opt-13b", 1) else e
        for e in profile.entries
    ]
    return str(profile.save(tmp_path / "noisy.json"))


def test_a_measured_step_spread_is_drawn_per_step_unless_turned_off(tmp_path, capsys):
    noisy = ["--profile", _noisy_profile(tmp_path), "--placement", "colocated"]
    drawn = _run(capsys, *noisy)
    plain = _run(capsys, *noisy, "--no-step-noise")
    median = _run(capsys, "--placement", "colocated")  # the same fit, no spread measured
    assert drawn["step_noise"] and not plain["step_noise"] and not median["step_noise"]
    mean = [r["runs"][0]["ttft_s"]["mean"] for r in (drawn, plain, median)]
    assert mean[0] != mean[1] and mean[1] == mean[2]
    # The fast simulator jumps over steps in closed form: no per-step draw to make.
    assert not _run(capsys, *noisy, "--simulator", "fast")["step_noise"]


def test_the_table_header_says_whether_step_times_are_drawn(tmp_path, capsys):
    assert main(["simulate", "--num-requests", "20", "--placement", "colocated"]) == 0
    assert "step-time spread: none" in capsys.readouterr().out.splitlines()[0]
    assert main(["simulate", "--num-requests", "20", "--placement", "colocated",
                 "--profile", _noisy_profile(tmp_path)]) == 0  # fmt: skip
    assert "step-time spread: measured" in capsys.readouterr().out.splitlines()[0]
