"""The benchmark harness itself: cases are correct before timing, wrong ops are refused."""

from __future__ import annotations

import json

import pytest
import torch

from distserve_rt.benchmarks import op_cases
from distserve_rt.benchmarks.environment import save_result
from distserve_rt.benchmarks.op_suite import CorrectnessError, format_table, run_case

SMALL_CASES = [
    lambda: op_cases.decode_attention_case(batch=2, context_len=40, num_heads=4, num_kv_heads=2),
    lambda: op_cases.prefill_attention_case(seq_len=33, num_seqs=2, num_heads=4, num_kv_heads=1),
    lambda: op_cases.write_kv_case(num_tokens=50, num_kv_heads=2, head_dim=64),
    lambda: op_cases.copy_blocks_case(num_pairs=3, block_bytes=4096),
]


@pytest.mark.parametrize("make_case", SMALL_CASES)
def test_case_checks_and_times(make_case):
    result = run_case(make_case(), min_time_s=0.001)
    assert result.rel_error <= result.case.tolerance
    assert result.ours.median_s > 0 and result.baseline.median_s > 0
    row = result.to_dict()
    assert row["op"] == result.case.op
    assert result.case.label.split(" ")[0] in format_table([result])


def test_wrong_op_is_not_timed():
    case = op_cases.decode_attention_case(batch=1, context_len=17, num_heads=2, num_kv_heads=1)
    case.ours = lambda: torch.zeros(1, 2, 128)  # a kernel that returns the wrong answer
    case.check = lambda: op_cases.rel_error(case.ours(), torch.ones(1, 2, 128))
    with pytest.raises(CorrectnessError, match="relative error"):
        run_case(case, min_time_s=0.001)


def test_nan_never_passes():
    out = torch.tensor([float("nan"), 1.0])
    assert op_cases.rel_error(out, torch.ones(2)) == float("inf")


def test_saved_result_carries_provenance(tmp_path):
    path = save_result(tmp_path / "r.json", {"results": [1]})
    data = json.loads(path.read_text())
    for key in ("date", "git_commit", "command", "machine", "threads", "versions"):
        assert key in data
    assert data["results"] == [1]
