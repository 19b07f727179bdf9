"""The CPU layer ops (linear, rms_norm with and without the residual add, silu_and_mul,
rotary) against their plain-torch references on random inputs over parametrised shapes.

bf16/fp16 results must equal the eager reference bit for bit where the kernel follows the
same rounding steps (silu_and_mul, rotary), and within one rounding step elsewhere (linear
and rms_norm sum in another order)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distserve_rt import _native
from distserve_rt.ops import layer_ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rand(*shape, dtype, generator, scale=1.0):
    return (torch.randn(shape, generator=generator) * scale).to(dtype)


def _ulp_close(out: torch.Tensor, ref: torch.Tensor, max_frac: float = 0.02) -> None:
    """Equal up to one rounding step of out's dtype on at most `max_frac` of the elements."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert not torch.isnan(out).any()
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        return
    eps = torch.finfo(out.dtype).eps
    diff = (out.float() - ref.float()).abs()
    assert (diff <= 2 * eps * ref.float().abs() + 1e-6).all(), diff.max()
    assert (out != ref).float().mean().item() <= max_frac


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "m,n,k",
    [
        (1, 8, 8),
        (1, 37, 64),
        (2, 5, 16),
        (3, 64, 128),
        (7, 33, 24),
        (50, 100, 256),
        (97, 13, 40),
        (200, 40, 64),
        (2, 5, 4),  # in_features not a multiple of the 8-wide vectors: the scalar tail
        (5, 7, 12),
        (9, 3, 1027),
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_native_matches_fp32_reference(monkeypatch, generator, dtype, m, n, k, bias):
    monkeypatch.setenv("DRT_CPU_LINEAR", "native")
    layer_ops.cpu_linear_backend.cache_clear()
    x = _rand(m, k, dtype=dtype, generator=generator)
    w = _rand(n, k, dtype=dtype, generator=generator, scale=0.1)
    b = _rand(n, dtype=dtype, generator=generator) if bias else None
    out = layer_ops.linear(x, w, b)
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert out.dtype == dtype and out.shape == (m, n)
    # fp32 accumulation, one rounding to dtype at the end.
    err = (out.float() - ref).norm() / ref.norm()
    assert err < 2 * torch.finfo(dtype).eps, err
    layer_ops.cpu_linear_backend.cache_clear()


def test_linear_reads_strided_rows(monkeypatch, generator):
    """x may be a row slice of a wider tensor (a packed projection): the row stride is used."""
    monkeypatch.setenv("DRT_CPU_LINEAR", "native")
    layer_ops.cpu_linear_backend.cache_clear()
    wide = _rand(5, 48, dtype=torch.bfloat16, generator=generator)
    x = wide[:, 8:40]
    w = _rand(24, 32, dtype=torch.bfloat16, generator=generator)
    torch.testing.assert_close(
        layer_ops.linear(x, w).float(), F.linear(x.float(), w.float()), rtol=1e-2, atol=1e-2
    )
    layer_ops.cpu_linear_backend.cache_clear()


def test_linear_backend_choice(monkeypatch):
    layer_ops.cpu_linear_backend.cache_clear()
    monkeypatch.setenv("DRT_CPU_LINEAR", "bogus")
    with pytest.raises(ValueError, match="DRT_CPU_LINEAR must be one of"):
        layer_ops.cpu_linear_backend()
    layer_ops.cpu_linear_backend.cache_clear()
    monkeypatch.delenv("DRT_CPU_LINEAR")
    monkeypatch.setattr(layer_ops, "_cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert layer_ops.cpu_linear_backend() == "torch"
    layer_ops.cpu_linear_backend.cache_clear()
    monkeypatch.setattr(layer_ops, "_cpu_flags", lambda: {"avx2", "fma"})
    assert layer_ops.cpu_linear_backend() == "native"
    layer_ops.cpu_linear_backend.cache_clear()


def test_linear_rejects_bad_shapes(monkeypatch, generator):
    monkeypatch.setenv("DRT_CPU_LINEAR", "native")
    layer_ops.cpu_linear_backend.cache_clear()
    x = _rand(2, 16, dtype=torch.bfloat16, generator=generator)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        layer_ops.linear(x, _rand(4, 8, dtype=torch.bfloat16, generator=generator))
    with pytest.raises(ValueError, match="bias must be"):
        layer_ops.linear(x, _rand(4, 16, dtype=torch.bfloat16, generator=generator), x[0])
    layer_ops.cpu_linear_backend.cache_clear()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", [(1, 8), (3, 64), (17, 1024), (40, 200)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(generator, dtype, num_tokens, hidden, with_residual):
    x = _rand(num_tokens, hidden, dtype=dtype, generator=generator, scale=3.0)
    weight = _rand(hidden, dtype=dtype, generator=generator)
    residual = (
        _rand(num_tokens, hidden, dtype=dtype, generator=generator) if with_residual else None
    )
    ref_out, ref_residual = layer_ops.reference_rms_norm(x, weight, 1e-5, residual)
    x_before = x.clone()
    out = layer_ops.rms_norm(x, weight, 1e-5, residual)
    _ulp_close(out, ref_out)
    assert torch.equal(x, x_before)  # x is not modified
    if with_residual:
        assert torch.equal(residual, ref_residual)  # the add rounds exactly as torch's


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,d", [(1, 4), (5, 96), (33, 2816), (300, 64)])
def test_silu_and_mul_matches_reference(generator, dtype, num_tokens, d):
    x = _rand(num_tokens, 2 * d, dtype=dtype, generator=generator, scale=4.0)
    out = layer_ops.silu_and_mul(x)
    ref = layer_ops.reference_silu_and_mul(x)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    else:
        _ulp_close(out, ref, max_frac=0.01)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_tokens,num_heads,num_kv_heads,head_dim", [(1, 1, 1, 2), (4, 4, 2, 64), (9, 16, 4, 128)]
)
def test_rotary_matches_reference(generator, dtype, num_tokens, num_heads, num_kv_heads, head_dim):
    from distserve_rt.layers.rotary import inv_frequencies

    cos_sin = layer_ops.reference_cos_sin(inv_frequencies(head_dim, 10000.0, None), 4096)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    # Slices of one packed qkv tensor, as the model passes them.
    qkv = _rand(num_tokens, q_size + 2 * kv_size, dtype=dtype, generator=generator)
    q = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    v_before = qkv[:, q_size + kv_size :].clone()
    positions = torch.randint(0, 4096, (num_tokens,), generator=generator)
    ref_q, ref_k = layer_ops.reference_rotary(positions, q.clone(), k.clone(), cos_sin)
    layer_ops.rotary(positions, q, k, cos_sin)
    if dtype == torch.float32:
        torch.testing.assert_close(q, ref_q, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k, ref_k, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(q, ref_q) and torch.equal(k, ref_k)
    assert torch.equal(qkv[:, q_size + kv_size :], v_before)  # v untouched


def test_rotary_rejects_positions_outside_the_table(generator):
    from distserve_rt.layers.rotary import inv_frequencies

    cos_sin = layer_ops.reference_cos_sin(inv_frequencies(8, 10000.0, None), 16)
    q = _rand(2, 1, 8, dtype=torch.float32, generator=generator)
    k = _rand(2, 1, 8, dtype=torch.float32, generator=generator)
    with pytest.raises(ValueError, match=r"positions\[1\] = 16 is outside the cos/sin table"):
        layer_ops.rotary(torch.tensor([3, 16]), q, k, cos_sin)


def test_rotary_table_grows_to_cover_positions():
    from distserve_rt.layers.rotary import CosSinTable, inv_frequencies

    table = CosSinTable(inv_frequencies(8, 10000.0, None))
    first = table.covering(torch.tensor([5]))
    assert first.shape[0] == CosSinTable._MIN_POSITIONS
    grown = table.covering(torch.tensor([3, CosSinTable._MIN_POSITIONS * 3]))
    assert grown.shape[0] == CosSinTable._MIN_POSITIONS * 4
    assert torch.equal(grown[: first.shape[0]], first)


def test_ops_refuse_non_cpu_tensors():
    x = torch.zeros(2, 8, device="meta")
    with pytest.raises(ValueError, match="these ops are CPU kernels"):
        layer_ops.silu_and_mul(x)
    assert _native.cpu_module().get_num_threads() >= 1


def test_rotary_refuses_query_and_key_in_the_same_memory(generator):
    from distserve_rt.layers.rotary import inv_frequencies

    cos_sin = layer_ops.reference_cos_sin(inv_frequencies(8, 10000.0, None), 16)
    q = _rand(2, 1, 8, dtype=torch.float32, generator=generator)
    with pytest.raises(ValueError, match="query and key are the same memory"):
        layer_ops.rotary(torch.tensor([1, 2]), q, q, cos_sin)
