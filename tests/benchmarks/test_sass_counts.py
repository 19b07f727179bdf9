"""bench/gpu/sass_counts.py's counting on a committed nvdisasm excerpt (no nvcc, no GPU):
the NOTES.md before/after tables are only as good as these counts."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench" / "gpu"))  # a script folder, not a package

import sass_counts  # noqa: E402

EXCERPT = (Path(__file__).parent / "data" / "sass_excerpt.nvdisasm").read_text()
DECODE = "_ZN3drt4cuda19decode_split_kernelI13__nv_bfloat16Li128ELi16EEEvNS0_12DecodeParamsE"
PREFILL = "_ZN3drt4cuda18prefill_mma_kernelI6__halfLi64EEEvNS0_13PrefillParamsE"


def test_counts_shared_loads_by_width_and_special_functions():
    row = sass_counts.parse_nvdisasm(EXCERPT)[DECODE]
    assert (row["lds_u16"], row["lds_32"], row["lds_64"], row["lds_128"]) == (2, 1, 1, 1)
    assert (row["mufu_ex2"], row["mufu_rcp"], row["ldgsts"]) == (1, 2, 1)
    assert row["int_div32"] == 1  # I2F.RP opens a signed 32-bit division
    assert row["ex2_range_checks"] == 1  # IEEE exp2f's guard before its MUFU.EX2
    assert row["total"] == 14  # the NOP is padding, not work


def test_counts_tensor_core_local_memory_and_division_calls():
    row = sass_counts.parse_nvdisasm(EXCERPT)[PREFILL]
    assert (row["ldsm"], row["hmma"], row["ldl"], row["stl"]) == (2, 2, 1, 1)
    assert row["calls"] == {"div_s64": 2, "rcp_rn_f32_slowpath": 1, "rem_s64": 1}
    assert row["div_calls"] == 3  # the slow-path reciprocal is not a division call
    assert row["int_div32"] == 1
    # Subroutine bodies (with their I2F.U64.RP and MUFU.RCP64H) are not the kernel's own.
    assert row["total"] == 12 and row["subroutine_total"] == 6
    assert row["mufu_rcp"] == 0


def test_ptxas_report_parsed_per_kernel_and_arch():
    text = (
        f"ptxas info    : Compiling entry function '{PREFILL}' for 'sm_90a'\n"
        f"ptxas info    : Function properties for {PREFILL}\n"
        "    16 bytes stack frame, 6 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 190 registers, used 1 barriers, 96 bytes cmem[0]\n"
        "ptxas info    : Function properties for _ZN3drt4cuda14slot_block_anyEli\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        f"ptxas info    : Compiling entry function '{DECODE}' for 'sm_80'\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 61 registers, used 1 barriers, 36864 bytes smem, 96 bytes cmem[0]\n"
    )
    got = sass_counts.parse_ptxas(text)
    assert got[(PREFILL, "90a")] == {"registers": 190, "spill_bytes": 10, "smem_bytes": 0}
    assert got[(DECODE, "80")] == {"registers": 61, "spill_bytes": 0, "smem_bytes": 36864}


def test_short_names_and_table():
    demangled = (
        "void drt::cuda::decode_split_kernel<__nv_bfloat16, 128, 16>(drt::cuda::DecodeParams)"
    )
    assert sass_counts.short_name(demangled) == "decode_split_kernel<bf16,128,16>"
    assert (
        sass_counts.short_name("void drt::cuda::copy_blocks_kernel<uint4>(x)")
        == "copy_blocks_kernel<u4>"
    )
    table = sass_counts.markdown([{"kernel": "k<fp16,64>", "arch": "90a", "hmma": 2}])
    header, _, row = table.splitlines()
    assert header.startswith("| kernel | arch | registers | spill_bytes | lds_u16 |")
    assert row.startswith("| k<fp16,64> | 90a |  |  | ") and "| 2 |" in row


def test_summary_puts_sm80_registers_beside_sm90a():
    rows = [
        {"kernel": "decode<bf16>", "arch": "80", "registers": 61, "spill_bytes": 0},
        {"kernel": "decode<bf16>", "arch": "90a", "registers": 70, "spill_bytes": 0, "hmma": 0},
        {"kernel": "prefill<bf16>", "arch": "90a", "registers": 190, "spill_bytes": 0},
    ]
    (row,) = sass_counts.summary(rows, "^decode")
    assert (row["registers"], row["spill_bytes"], row["arch"]) == ("70/61", "0/0", "90a/80")


def test_non_inlined_function_is_a_subroutine_not_a_division():
    simt = "_ZN3drt4cuda19prefill_simt_kernelILi64EEEvNS0_13PrefillParamsE"
    row = sass_counts.parse_nvdisasm(EXCERPT)[simt]
    assert row["calls"] == {"_ZN3drt4cuda14slot_block_anyEli": 1}
    assert (row["div_calls"], row["total"], row["subroutine_total"]) == (0, 2, 3)
