"""plan/simulate --dataset-path: a user's lengths (JSONL or CSV) and arrival trace."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from distserve_rt.entrypoints import planner_args, simulate
from distserve_rt.entrypoints.cli import build_parser, main
from distserve_rt.workloads import Workload, load_length_file

PROMPTS = [100, 250, 40, 600, 75]
OUTPUTS = [20, 5, 64, 1, 33]
ARRIVALS = [1000.0, 1000.5, 1000.5, 1003.25, 1010.0]  # wall-clock-like: replayed from 0


def _jsonl(tmp_path, rows, name="lens.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _trace(tmp_path, *, arrivals=True):
    rows = []
    for p, o, t in zip(PROMPTS, OUTPUTS, ARRIVALS, strict=True):
        rows.append({"prompt_len": p, "output_len": o, **({"arrival_s": t} if arrivals else {})})
    return _jsonl(tmp_path, rows)


def _csv(tmp_path, text):
    path = tmp_path / "lens.csv"
    path.write_text(text)
    return str(path)


def _workload(command, *flags):
    args = build_parser().parse_args([*command, *flags])
    return planner_args.build_workload(args)


@pytest.mark.parametrize("command", [["simulate"], ["plan", "--rate", "1"]])
def test_jsonl_lengths_are_sampled_like_a_dataset(tmp_path, command):
    path = _trace(tmp_path)
    w = _workload(command, "--dataset-path", path, "--num-requests", "40", "--seed", "3")
    # The same draw `--dataset` makes from a built-in dataset's rows.
    expected = Workload("x", np.array(PROMPTS), np.array(OUTPUTS)).sample(40, seed=3)
    assert w.num_requests == 40
    assert np.array_equal(w.prompt_lens, expected.prompt_lens)
    assert np.array_equal(w.output_lens, expected.output_lens)
    assert {(int(p), int(o)) for p, o in zip(w.prompt_lens, w.output_lens, strict=True)} <= set(
        zip(PROMPTS, OUTPUTS, strict=True)
    )


def test_csv_round_trip_with_our_data_files_column_names(tmp_path):
    # prompt_tokens/output_tokens: the spelling of the package's own sharegpt CSV.
    rows = "".join(f"{p},{o}\n" for p, o in zip(PROMPTS, OUTPUTS, strict=True))
    path = _csv(tmp_path, "prompt_tokens,output_tokens\n" + rows)
    f = load_length_file(path)
    assert f.prompt_lens.tolist() == PROMPTS and f.output_lens.tolist() == OUTPUTS
    assert f.arrival_s is None
    w = _workload(["simulate"], "--dataset-path", path, "--num-requests", "7")
    assert w.num_requests == 7 and set(w.prompt_lens.tolist()) <= set(PROMPTS)


def test_csv_timestamp_column_is_a_trace_from_zero(tmp_path):
    rows = "".join(f"{t},{p},{o}\n" for p, o, t in zip(PROMPTS, OUTPUTS, ARRIVALS, strict=True))
    f = load_length_file(_csv(tmp_path, "timestamp,prompt_len,output_len\n" + rows))
    assert f.arrival_s.tolist() == [t - ARRIVALS[0] for t in ARRIVALS]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "{path}: no requests: the file has no rows"),
        ("\n\n", "{path}: no requests: the file has no rows"),
        (
            '{"prompt_len": 5, "output_len": 2}\n{"prompt_len": 5}\n',
            "{path}:2: missing output_len or output_tokens",
        ),
        ('{"prompt_len": 0, "output_len": 2}\n', "{path}:1: prompt_len must be >= 1 token, got 0"),
        (
            '{"prompt_len": 5, "output_len": 2}\n\n{"prompt_len": 5, "output_len": -3}\n',
            "{path}:3: output_len must be >= 1 token, got -3",
        ),
        (
            '{"prompt_len": "many", "output_len": 2}\n',
            "{path}:1: prompt_len must be a whole number of tokens, got 'many'",
        ),
        (
            '{"prompt_len": 5.5, "output_len": 2}\n',
            "{path}:1: prompt_len must be a whole number of tokens, got 5.5",
        ),
        ("prompt_len,output_len\n", "{path}: no requests: the file has no rows"),
        ("prompt_len,output\n5,2\n", "{path}:1: the header has no output length column"),
        ("prompt_len,output_len\n5,2\n7,x\n", "{path}:3: output_len must be a whole number"),
        ("prompt_len,output_len\n5,2\n7\n", "{path}:3: output_len must be a whole number"),
        ('{"prompt_len": 5, "output_len": 2\n', "{path}:1: not valid JSON"),
        (
            "prompt_len,output_len,arrival_s\n5,2,1.0\n5,2,0.5\n",
            "{path}:3: arrival_s 0.5 is before the previous row's 1; sort the trace by arrival",
        ),
        (
            "prompt_len,output_len,arrival_s\n5,2,1.0\n5,2,soon\n",
            "{path}:3: arrival_s must be a finite number of seconds, got 'soon'",
        ),
        (
            '{"prompt_len": 5, "output_len": 2}\n'
            '{"prompt_len": 5, "output_len": 2, "timestamp": 1}\n',
            "{path}:2: has an arrival time, unlike the first row",
        ),
    ],
)
def test_a_bad_file_is_one_line_naming_file_line_and_fault(tmp_path, content, message):
    suffix = ".csv" if content.startswith("prompt_len,") else ".jsonl"
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--dataset-path", str(path)])
    text = str(exc.value)
    assert text.startswith("drt-run simulate: " + message.format(path=path))
    assert "\n" not in text


def test_a_file_of_unknown_format_or_missing_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"lens\.txt: cannot tell the format .* \.jsonl .* \.csv"):
        load_length_file(tmp_path / "lens.txt")
    with pytest.raises(ValueError, match=r"gone\.jsonl: no such file"):
        load_length_file(tmp_path / "gone.jsonl")


@pytest.mark.parametrize("other", [["--dataset", "chat"], ["--fixed-lengths", "8,8"]])
@pytest.mark.parametrize("command", [["simulate"], ["plan", "--rate", "1"]])
def test_dataset_path_excludes_the_other_length_sources(tmp_path, capsys, command, other):
    with pytest.raises(SystemExit):
        main([*command, "--dataset-path", _trace(tmp_path), *other])
    err = capsys.readouterr().err
    assert f"argument {other[0]}: not allowed with argument --dataset-path" in err


def test_simulate_dataset_path_end_to_end(tmp_path, capsys):
    path = _trace(tmp_path, arrivals=False)
    argv = ["simulate", "--dataset-path", path, "--num-requests", "30", "--rates", "1", "2"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["rate"] for r in out["runs"]] == [1.0, 2.0]
    assert all(r["arrivals"] == "poisson" and r["num_requests"] == 30 for r in out["runs"])


def _replayed_arrivals(monkeypatch) -> list[np.ndarray]:
    """Spy on what the simulator was given: the arrival times of every replayed run."""
    seen = []
    run_one = simulate._simulate

    def spy(args, simulator, spec, evaluator, arrival_s, *rest):
        result = run_one(args, simulator, spec, evaluator, arrival_s, *rest)
        seen.append(result.arrival.copy())
        return result

    monkeypatch.setattr(simulate, "_simulate", spy)
    return seen


def test_simulate_use_arrivals_replays_the_files_times(tmp_path, capsys, monkeypatch):
    seen = _replayed_arrivals(monkeypatch)
    assert main(["simulate", "--dataset-path", _trace(tmp_path), "--use-arrivals", "--json"]) == 0
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    assert run["arrivals"] == "trace" and run["num_requests"] == len(PROMPTS)
    # 4 gaps over the trace's 10 s: its mean rate, where a --rates run shows its rate.
    assert run["rate"] == pytest.approx(4 / 10.0)
    assert len(seen) == 1 and seen[0].tolist() == [t - ARRIVALS[0] for t in ARRIVALS]


def test_use_arrivals_takes_the_traces_first_rows(tmp_path, capsys, monkeypatch):
    seen = _replayed_arrivals(monkeypatch)
    argv = ["simulate", "--dataset-path", _trace(tmp_path), "--use-arrivals"]
    assert main([*argv, "--num-requests", "3"]) == 0
    assert "   4.000" in capsys.readouterr().out  # 2 gaps in 0.5 s
    assert seen[0].tolist() == [0.0, 0.5, 0.5]


def test_a_burst_trace_waits_longer_than_a_spread_one(tmp_path, capsys):
    # The replayed times change the answer: 40 long prompts at once queue for prefill.
    def ttft_p90(gap_s: float) -> float:
        rows = [{"prompt_len": 1500, "output_len": 4, "arrival_s": i * gap_s} for i in range(40)]
        path = _jsonl(tmp_path, rows, f"gap{gap_s}.jsonl")
        assert main(["simulate", "--dataset-path", path, "--use-arrivals", "--json"]) == 0
        return json.loads(capsys.readouterr().out)["runs"][0]["ttft_s"]["p90"]

    assert ttft_p90(0.0) > 5 * ttft_p90(10.0)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rates", "2"], "--rates and --use-arrivals are exclusive: the trace sets the rate"),
        (["--cv", "2"], "--cv and --use-arrivals are exclusive: the trace sets the burstiness"),
        (["--num-requests", "6"], "--num-requests must be 1..5 (the rows of "),
    ],
)
def test_use_arrivals_refuses_flags_that_would_change_the_trace(tmp_path, flags, message):
    argv = ["simulate", "--dataset-path", _trace(tmp_path), "--use-arrivals", *flags]
    with pytest.raises(SystemExit, match=re.escape(f"drt-run simulate: {message}")):
        main(argv)


def test_use_arrivals_needs_a_trace(tmp_path):
    with pytest.raises(SystemExit, match="--use-arrivals replays the arrival column of"):
        main(["simulate", "--use-arrivals"])
    path = _trace(tmp_path, arrivals=False)
    with pytest.raises(SystemExit, match="has no arrival column; .* arrival_s, timestamp"):
        main(["simulate", "--dataset-path", path, "--use-arrivals"])
