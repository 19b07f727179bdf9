"""CPU op microbenchmarks: each op and its torch baseline on the same data, same process."""

from __future__ import annotations

import pytest
import torch

from distserve_rt.benchmarks import op_cases

DTYPES = [torch.float32, torch.bfloat16]


def _bench(benchmark, case, which: str) -> None:
    benchmark.group = case.label
    benchmark.extra_info.update(case.params)
    benchmark.extra_info["baseline"] = case.baseline_name
    benchmark(case.ours if which == "ours" else case.baseline)


@pytest.mark.parametrize("which", ["ours", "baseline"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_attention(benchmark, checked, dtype, which):
    case = checked(op_cases.decode_attention_case(batch=8, context_len=2048, dtype=dtype))
    _bench(benchmark, case, which)


@pytest.mark.parametrize("which", ["ours", "baseline"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_attention(benchmark, checked, dtype, which):
    case = checked(op_cases.prefill_attention_case(seq_len=1024, dtype=dtype))
    _bench(benchmark, case, which)


@pytest.mark.parametrize("which", ["ours", "baseline"])
def test_write_kv(benchmark, checked, which):
    case = checked(op_cases.write_kv_case(num_tokens=4096))
    _bench(benchmark, case, which)


@pytest.mark.parametrize("which", ["ours", "baseline"])
def test_copy_blocks(benchmark, checked, which):
    case = checked(op_cases.copy_blocks_case(num_pairs=64, block_bytes=1 << 20))
    _bench(benchmark, case, which)
