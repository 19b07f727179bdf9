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
            ["simulate", "--no-decode-prefix-caching", "--local-prefill-max-tokens", "0"],
            "--no-decode-prefix-caching, --local-prefill-max-tokens: only with --dataset "
            "multi-turn",
        ),
        (
            [*FEW, "--placement", "colocated", "--max-decode-load-imbalance", "2"],
            "--max-decode-load-imbalance: only with --placement disaggregated",
        ),
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


def test_conditional_disaggregation_reaches_the_replay(capsys):
    """Serve's routing flags drive the disaggregated replay: local prefills appear only with
    a threshold, and the report carries them and the blocks pulled and reused."""
    off = _run(capsys, "--placement", "disaggregated")
    on = _run(capsys, "--placement", "disaggregated", "--local-prefill-max-tokens", "4096")
    assert off["disagg"]["local_prefill_max_tokens"] == 0
    assert on["disagg"] == {
        "decode_prefix_caching": True,
        "max_decode_load_imbalance": 4,
        "local_prefill_max_tokens": 4096,
        "local_prefill_min_queue_tokens": 0,
    }
    (a,), (b,) = off["runs"], on["runs"]
    assert a["num_local_prefills"] == 0 and b["num_local_prefills"] > 0
    assert a["num_blocks_pulled"] > 0 and a["num_blocks_reused"] > 0
    assert b["num_blocks_pulled"] < a["num_blocks_pulled"]  # local turns pull nothing


def test_disaggregated_table_shows_local_prefills_and_blocks(capsys):
    argv = [*FEW[:-1], "--placement", "disaggregated", "--local-prefill-max-tokens", "4096"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[-3:] == ["local", "pulled", "reused"]
    assert int(lines[3].split()[-3]) > 0


def test_a_negative_threshold_is_a_flag_error(capsys):
    with pytest.raises(SystemExit):
        main([*FEW, "--local-prefill-min-queue-tokens", "-1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--local-prefill-min-queue-tokens: must be an int >= 0, got -1" in err
