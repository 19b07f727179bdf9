"""drt-run simulate --dataset multi-turn: conversations with the prefix cache on the
scheduler-driven simulator and its refusals (plan's: test_plan_multi_turn.py)."""

from __future__ import annotations

import json

import pytest

from distserve_rt.entrypoints.cli import main

FEW = ["simulate", "--dataset", "multi-turn", "--num-conversations", "12", "--length-scale"]
FEW += ["0.3", "--rates", "0.5", "--json"]


def _run(capsys, *flags: str) -> dict:
    assert main([*FEW, *flags]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("placement", ["colocated", "disaggregated"])
def test_prefix_cache_on_and_off(capsys, placement):
    on = _run(capsys, "--placement", placement)
    off = _run(capsys, "--placement", placement, "--no-prefix-caching")
    assert on["prefix_caching"] and not off["prefix_caching"]
    (a,), (b,) = on["runs"], off["runs"]
    assert a["num_conversations"] == 12 and 36 <= a["num_requests"] <= 60
    assert a["prefix_cache_hits"] > 0 and b["prefix_cache_hits"] == 0
    assert 0 < a["hit_rate"] < 1
    assert a["ttft_s"]["mean"] < b["ttft_s"]["mean"]


def test_table(capsys):
    assert main([*FEW[:-1], "--placement", "colocated"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "multi-turn" in lines[0] and "prefix caching on" in lines[1]
    assert lines[2].split() == ["conv/s", "req/s", "attain", "ttft", "p90", "tpot", "p90", "hits"]
    assert lines[3].split()[0] == "0.500" and lines[3].endswith("%")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*FEW, "--simulator", "fast"], "--dataset multi-turn needs --simulator scheduler"),
        ([*FEW, "--num-requests", "5"], "--num-requests does not apply to --dataset multi-turn"),
        ([*FEW, "--turns", "3"], "--turns must be MIN,MAX (ints), got '3'"),
        (["simulate", "--turns", "3,4"], "--turns: only with --dataset multi-turn"),
        (
            ["simulate", "--dataset", "multi-turn", "--length-scale", "1"],
            "max_seq_len=2048 is too short",
        ),
    ],
)
def test_refusals_are_one_line(capsys, argv, message):
    try:  # simulate exits with its message (SystemExit), other errors print one line
        assert main(argv) == 1
        err = capsys.readouterr().err
    except SystemExit as exc:
        err = str(exc)
    assert message in err and len(err.strip().splitlines()) == 1
