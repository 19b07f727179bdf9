"""`drt-run bench --compare`: one engine per setup, the same requests and arrivals for each,
the per-run tables and then the side-by-side table (fake engines; one real run of the tiny
model colocated vs disaggregated)."""

from __future__ import annotations

import json

import pytest

from distserve_rt.benchmarks.serving.compare import CompareEntry
from distserve_rt.entrypoints import engine_args
from distserve_rt.entrypoints.cli import main
from distserve_rt.workloads import Workload
from tests.benchmarks.fake_engine import FakeEngine

COMMON = [
    "--dataset-name", "random", "--num-prompts", "6", "--random-input-len", "8",
    "--random-output-len", "4", "--disable-tqdm", "--slo-ttft-ms", "30", "--slo-tpot-ms", "500",
]  # fmt: skip
SIDE_BY_SIDE = "============ Setups side by side (same requests, same arrivals) ============"


def test_entries_parse_placement_and_policy():
    entry = CompareEntry.parse("colocated:chunked_prefill")
    assert not entry.placement.is_disaggregated and entry.policy == "chunked_prefill"
    entry = CompareEntry.parse("disaggregated")
    assert entry.placement.is_disaggregated and entry.policy is None
    with pytest.raises(ValueError, match="colocated placements only"):
        CompareEntry.parse("disaggregated:chunked_prefill")
    with pytest.raises(ValueError, match="placement must be 'colocated', 'disaggregated'"):
        CompareEntry.parse("colocated:fifo")


def test_compare_runs_every_setup_on_the_same_requests(monkeypatch, tmp_path, capsys):
    built = []

    def build(args, *, placement=None, policy=None):
        # The disaggregated fake is slower to its first token: it must miss the 30 ms TTFT.
        slow = placement is not None and placement.is_disaggregated
        built.append((placement, policy))
        built[-1] += (FakeEngine(ttft_s=0.05 if slow else 0.002),)
        return built[-1][2]

    monkeypatch.setattr(engine_args, "build_engine_client", build)
    argv = ["bench", *COMMON, "--request-rate", "200", "--save-result", "--result-dir"]
    argv += [str(tmp_path), "--result-filename", "cmp.json", "--goodput-search"]
    argv += ["--goodput-min-rate", "100", "--goodput-max-rate", "400", "--num-devices", "2"]
    argv += ["--compare", "colocated", "disaggregated", "colocated:chunked_prefill"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert [(p.is_disaggregated, policy) for p, policy, _ in built] == [
        (False, None),
        (True, None),
        (False, "chunked_prefill"),
    ]
    # One warm-up request (8 output tokens at most), unscored, then the runs.
    assert [rid for rid, _, _ in built[0][2].received[:2]] == ["warmup-0", "bench-0"]
    received = [[ids for _, ids, _ in engine.received[:7]] for _, _, engine in built]
    assert received[0] == received[1] == received[2]  # same requests, in the same order
    assert out.index("Serving Benchmark Result") < out.index(SIDE_BY_SIDE)
    table = out[out.index(SIDE_BY_SIDE) :].splitlines()
    assert table[1].split()[:3] == ["setup", "rate", "completed"]
    assert [line.split()[0] for line in table[2:5]] == [
        "colocated",
        "disaggregated",
        "colocated:chunked_prefill",
    ]
    assert "per-device goodput" in out and "over 2 device(s)" in out
    data = json.loads((tmp_path / "cmp.json").read_text())
    rows = {row["setup"]: row for row in data["table"]}
    assert rows["colocated"]["attainment"]["joint"] == 1.0
    assert rows["disaggregated"]["attainment"]["joint"] == 0.0
    assert rows["disaggregated"]["mean_ttft_ms"] > 40
    assert [s["label"] for s in data["sweeps"]] == data["setups"]
    assert data["sweeps"][1]["goodput_search"]["per_device_goodput"] == 0.0
    assert len(data["provenance"]["machine"]["load_average"]) == 3
    assert (tmp_path / "cmp.png").stat().st_size > 1000
    assert (tmp_path / "colocated-chunked_prefill-sweep-fake-model.json").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--base-url", "http://127.0.0.1:1"], "cannot be used with --base-url"),
        (["--placement", "disaggregated"], "drop --placement"),
        (["--compare", "colocated", "colocated"], "lists a setup twice"),
    ],
)
def test_compare_rejects_conflicting_flags(extra, message):
    argv = ["bench", *COMMON, "--compare", "colocated", "disaggregated", *extra]
    with pytest.raises(SystemExit, match=message):
        main(argv)


def test_bad_compare_entry_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--compare", "sideways"])
    err = capsys.readouterr().err
    assert "argument --compare" in err and "'sideways'" in err


def test_length_scale_shrinks_a_dataset():
    chat = Workload.from_dataset("chat").sample(50, seed=1)
    small = chat.scaled(0.125)
    assert small.num_requests == 50 and small.prompt_lens.min() >= 1
    assert abs(small.prompt_lens.mean() - chat.prompt_lens.mean() / 8) < 1
    assert chat.scaled(1) is chat
    with pytest.raises(ValueError, match="factor must be a number > 0, got 0"):
        chat.scaled(0)


def test_compare_colocated_and_disaggregated_tiny_model(capsys):
    """The real engines: a handful of requests through both placements."""
    argv = ["bench", "--dataset-name", "chat", "--length-scale", "0.05", "--num-prompts", "4"]
    argv += ["--disable-tqdm", "--request-rate", "inf", "--kv-cache-memory-bytes", "16MiB"]
    argv += ["--max-model-len", "256", "--compare", "colocated", "disaggregated"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = out[out.index(SIDE_BY_SIDE) :].splitlines()[2:4]
    assert [r.split()[:3] for r in rows] == [
        ["colocated", "inf", "4/4"],
        ["disaggregated", "inf", "4/4"],
    ]
