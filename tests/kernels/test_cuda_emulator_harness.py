"""The CUDA emulator itself (csrc/cuda_emu): its warp collectives against a plain matrix
product, and each rule it must enforce shown on a small kernel that breaks it
(csrc/cuda_emu/harness_kernels.cu). The project's kernels are tested in
test_cuda_emulated.py."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.cache_helpers import randn
from tests.kernels.test_cuda_emulated import EMU, guarded

# ---- the harness itself -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_ldmatrix_and_mma_compute_a_matrix_product(generator, dtype):
    """The warp collectives on their own, through the canonical fragment loads (A with
    ldmatrix.x4; B as [n, k] with ldmatrix.x4 and as [k, n] with .trans): D = A B exactly
    as fp32 accumulation of the 16-bit inputs gives it."""
    a = torch.randn(16, 16, generator=generator).to(dtype)
    b = torch.randn(16, 16, generator=generator).to(dtype)
    inputs = [guarded(t.contiguous()) for t in (a, b.t(), b)]
    d_nk, d_kn = guarded(torch.zeros(16, 16)), guarded(torch.zeros(16, 16))
    EMU.harness_mma(
        dtype == torch.bfloat16, *(t.data_ptr() for t in inputs), d_nk.data_ptr(), d_kn.data_ptr()
    )
    expected = (a.double() @ b.double()).float()
    torch.testing.assert_close(d_nk, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(d_kn, expected, rtol=0, atol=1e-6)


# ---- the harness catches what it should --------------------------------------------------


def test_missing_barrier_arrival_is_an_error():
    out = guarded(torch.zeros(64, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"threads 0-4, 6-63 wait at __syncthreads .* 5 exited"):
        EMU.harness_missing_arrival(out.data_ptr())


def test_divergent_barriers_are_an_error():
    out = guarded(torch.zeros(64, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"divergent __syncthreads: threads 0-31 at .*32-63 at"):
        EMU.harness_divergent_barrier(out.data_ptr())


def test_missing_lane_at_a_shuffle_is_an_error():
    out = guarded(torch.zeros(32))
    with pytest.raises(RuntimeError, match=r"lane 3 exited while lanes of its warp wait"):
        EMU.harness_missing_lane(out.data_ptr())


def test_missing_lane_at_syncwarp_is_an_error():
    out = guarded(torch.zeros(32))
    with pytest.raises(RuntimeError, match=r"lane 7 exited while lanes of its warp wait"):
        EMU.harness_syncwarp_missing_lane(out.data_ptr())


def test_cp_async_destination_reads_nan_until_its_wait():
    src = guarded(torch.arange(128, dtype=torch.float32))
    out = guarded(torch.zeros(128))
    EMU.harness_cp_async_then_read(src.data_ptr(), out.data_ptr(), True)
    assert torch.equal(out, src.view(32, 4).roll(-1, 0).flatten())
    EMU.harness_cp_async_then_read(src.data_ptr(), out.data_ptr(), False)
    assert out.isnan().all()


def test_out_of_bounds_global_read_is_an_error():
    src = guarded(torch.arange(100, dtype=torch.float32))
    out = guarded(torch.zeros(101))
    EMU.harness_copy(src.data_ptr(), out.data_ptr(), 100)
    assert torch.equal(out[:100], src)
    with pytest.raises(
        RuntimeError, match=r"out-of-bounds access .* 0 bytes past the end of a 400-byte global"
    ):
        EMU.harness_copy(src.data_ptr(), out.data_ptr(), 101)


def test_misaligned_vector_read_is_an_error():
    """x86 reads a misaligned uint4 without complaint; a GPU faults, and so does the
    emulator (the kernels are compiled with alignment checks)."""
    src = torch.frombuffer(EMU.alloc(nbytes=528), dtype=torch.uint8)
    src.copy_(torch.arange(528) % 251)
    out = torch.frombuffer(EMU.alloc(nbytes=512), dtype=torch.uint8)
    EMU.harness_vector_read(src.data_ptr(), 16, out.data_ptr())
    assert torch.equal(out, src[16:])
    with pytest.raises(RuntimeError, match=r"misaligned address 0x[0-9a-f]+ for a 16-byte aligned"):
        EMU.harness_vector_read(src.data_ptr(), 8, out.data_ptr())


def test_block_larger_than_launch_bounds_is_an_error():
    out = guarded(torch.zeros(64, dtype=torch.int32))
    EMU.harness_bounded(out.data_ptr(), 32)
    assert out[:32].eq(1).all()
    with pytest.raises(RuntimeError, match=r"64 threads per block, more than its __launch_bou"):
        EMU.harness_bounded(out.data_ptr(), 64)


def test_kernel_reading_past_a_short_buffer_is_an_error(generator):
    """A launcher told of more tokens than the key buffer holds: the write_kv kernel's first
    read past the end raises (on a GPU: a silent read of a neighbour, or a later crash)."""
    key = guarded(randn((4, 1, 64), torch.float32, generator, "cpu"))
    cache = guarded(torch.zeros(2, 2, 1, 8, 64))
    slots = guarded(torch.arange(5, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"write_kv_kernel.*out-of-bounds access"):
        EMU.write_kv(
            key=key.data_ptr(),
            value=cache.data_ptr(),
            kv_cache=cache.data_ptr(),
            slot_mapping=slots.data_ptr(),
            num_tokens=5,
            num_kv_heads=1,
            head_dim=64,
            key_token_stride=64,
            value_token_stride=64,
            num_blocks=2,
            block_size=8,
            kv_block_stride=2 * 8 * 64,
            dtype=0,
            stream=0,
        )


def test_warp_orders_differ_between_passes():
    """A read of another warp's shared write with no barrier between: correct when the
    writer runs first, NaN (never-written shared memory) when the reader does."""
    out = guarded(torch.zeros(1))
    EMU.set_warp_order(order="forward")
    EMU.harness_unsynchronised_read(out.data_ptr())
    assert out.item() == 1.0
    EMU.set_warp_order(order="reverse")
    EMU.harness_unsynchronised_read(out.data_ptr())
    assert out.isnan().all()


def test_bad_warp_order_names_the_allowed_values():
    with pytest.raises(ValueError, match=r"order must be one of 'forward', 'reverse', 'random'"):
        EMU.set_warp_order(order="backwards")
