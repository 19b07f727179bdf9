"""Per-layer CPU ops of the decoder: ``linear`` with 16-bit weights, ``rms_norm`` (with the
residual add fused), ``silu_and_mul`` and ``rotary`` (RoPE from a cos/sin table).

They replace eager torch sequences that dominated a CPU engine step (see
``bench/results/engine_profile_cpu.json``): RMSNorm's upcast/pow/mean/rsqrt/multiply chain,
RoPE's per-layer cos/sin and ``cat``-based rotate_half, and bf16 matmuls, which oneDNN runs
on a generic slow path on CPUs without bf16 dot-product instructions. Every op rounds like
HF transformers' eager modules (see ``include/distserve_rt/cpu/layer_ops.h``) and has a
plain-torch ``reference_*`` that tests compare against.

These are CPU kernels: the layers call them for CPU tensors and keep their eager torch code
on CUDA (where the work is a small part of a step); the wrappers refuse other devices.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from distserve_rt import _native
from distserve_rt.logger import init_logger

logger = init_logger(__name__)

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_LINEAR_BACKENDS = ("native", "torch")
# CPU flags with which oneDNN runs bf16 matmuls on dot-product hardware (faster than ours).
_BF16_HARDWARE_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def cpu_linear_backend() -> str:
    """Which code runs 16-bit CPU matmuls: "native" (`linear.h`) or "torch" (oneDNN).

    ``DRT_CPU_LINEAR=native|torch`` decides; by default "torch" where the CPU has bf16
    dot-product instructions (oneDNN uses them) and "native" elsewhere. Logged once."""
    choice = os.environ.get("DRT_CPU_LINEAR", "")
    if choice and choice not in _LINEAR_BACKENDS:
        raise ValueError(f"DRT_CPU_LINEAR must be one of {_LINEAR_BACKENDS}, got {choice!r}")
    if choice:
        reason = "DRT_CPU_LINEAR"
    else:
        hardware = sorted(_cpu_flags().intersection(_BF16_HARDWARE_FLAGS))
        choice = "torch" if hardware else "native"
        reason = f"CPU bf16 instructions: {', '.join(hardware) or 'none'}"
    logger.info("16-bit CPU matmuls run on the %s kernel (%s)", choice, reason)
    return choice


def _check_cpu(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(f"{name} is on {tensor.device}; these ops are CPU kernels")


def _check_same(name: str, tensor: torch.Tensor, dtype: torch.dtype, shape: tuple) -> None:
    if tensor.dtype != dtype or tuple(tensor.shape) != shape:
        raise ValueError(
            f"{name} must be {dtype} with shape {shape}, got {tensor.dtype} {tuple(tensor.shape)}"
        )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [num_tokens, in] -> [num_tokens, out]``: ``x @ weight.T + bias`` in x's dtype.

    ``weight [out, in]`` contiguous, same dtype as x; x's rows contiguous (any row stride).
    float16/bfloat16 run on the native kernel when `cpu_linear_backend` says so, float32
    always on torch's sgemm."""
    _check_cpu("x", x)
    if x.dtype not in _HALF_DTYPES or cpu_linear_backend() == "torch":
        return F.linear(x, weight, bias)
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be 2-D with contiguous rows, got {tuple(x.shape)} {x.stride()}")
    m, k = x.shape
    if weight.dim() != 2 or weight.shape[1] != k or not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous [out, {k}], got {tuple(weight.shape)}")
    n = weight.shape[0]
    _check_same("weight", weight, x.dtype, (n, k))
    if bias is not None:
        _check_same("bias", bias, x.dtype, (n,))
    out = torch.empty(m, n, dtype=x.dtype)
    _native.cpu_module().linear(
        x=x.data_ptr(),
        weight=weight.data_ptr(),
        bias=_native.ptr(bias),
        out=out.data_ptr(),
        m=m,
        n=n,
        k=k,
        x_row_stride=x.stride(0),
        dtype=_native.dtype_code(x.dtype),
        out_fp32=False,
    )
    return out


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [num_tokens, hidden]`` normalised: ``weight * x / sqrt(mean(x^2) + eps)``.

    With ``residual`` (same shape, contiguous): first ``residual += x`` in place, then the
    new residual is normalised. Returns a new tensor (x is not modified)."""
    _check_cpu("x", x)
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be 2-D with contiguous rows, got {tuple(x.shape)} {x.stride()}")
    num_tokens, hidden = x.shape
    _check_same("weight", weight, x.dtype, (hidden,))
    if residual is not None:
        _check_same("residual", residual, x.dtype, (num_tokens, hidden))
        if not residual.is_contiguous():
            raise ValueError("residual must be contiguous")
    out = torch.empty(num_tokens, hidden, dtype=x.dtype)
    _native.cpu_module().rms_norm(
        x=x.data_ptr(),
        residual=_native.ptr(residual),
        out=out.data_ptr(),
        weight=weight.data_ptr(),
        num_tokens=num_tokens,
        hidden=hidden,
        x_stride=x.stride(0),
        eps=eps,
        dtype=_native.dtype_code(x.dtype),
    )
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``x [num_tokens, 2 * d] -> [num_tokens, d]``: ``silu(x[:, :d]) * x[:, d:]``."""
    _check_cpu("x", x)
    if x.dim() != 2 or x.shape[1] % 2 or not x.is_contiguous():
        raise ValueError(f"x must be contiguous [num_tokens, 2 * d], got {tuple(x.shape)}")
    num_tokens, d = x.shape[0], x.shape[1] // 2
    out = torch.empty(num_tokens, d, dtype=x.dtype)
    _native.cpu_module().silu_and_mul(
        x=x.data_ptr(),
        out=out.data_ptr(),
        num_tokens=num_tokens,
        d=d,
        dtype=_native.dtype_code(x.dtype),
    )
    return out


def rotary(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin: torch.Tensor
) -> None:
    """Neox-style RoPE applied in place to ``query [num_tokens, num_heads, head_dim]`` and
    ``key [num_tokens, num_kv_heads, head_dim]`` (heads x dim contiguous, any token stride:
    slices of a packed qkv projection). ``positions`` int64 ``[num_tokens]``; ``cos_sin``
    float32 ``[max_position, 2, head_dim / 2]`` (`reference_cos_sin`); a position outside
    the table is a ValueError."""
    _check_cpu("query", query)
    if query.dim() != 3 or key.dim() != 3 or query.shape[2] != key.shape[2]:
        raise ValueError(
            f"query and key must be [num_tokens, heads, head_dim], got "
            f"{tuple(query.shape)} and {tuple(key.shape)}"
        )
    num_tokens, num_heads, head_dim = query.shape
    for name, t in (("query", query), ("key", key)):
        if t.stride(2) != 1 or t.stride(1) != head_dim or t.dtype != query.dtype:
            raise ValueError(f"{name} must have dense heads of one dtype, strides {t.stride()}")
    _check_same("positions", positions, torch.int64, (num_tokens,))
    if query.data_ptr() == key.data_ptr():
        raise ValueError("query and key are the same memory; rotary rotates each in place once")
    if (
        cos_sin.dtype != torch.float32
        or cos_sin.dim() != 3
        or cos_sin.shape[1:]
        != (
            2,
            head_dim // 2,
        )
    ):
        raise ValueError(
            f"cos_sin must be float32 [max_position, 2, {head_dim // 2}], got "
            f"{cos_sin.dtype} {tuple(cos_sin.shape)}"
        )
    _native.cpu_module().rotary(
        query=query.data_ptr(),
        key=key.data_ptr(),
        positions=positions.contiguous().data_ptr(),
        cos_sin=cos_sin.data_ptr(),
        num_tokens=num_tokens,
        num_heads=num_heads,
        num_kv_heads=key.shape[1],
        head_dim=head_dim,
        query_stride=query.stride(0),
        key_stride=key.stride(0),
        max_position=cos_sin.shape[0],
        dtype=_native.dtype_code(query.dtype),
    )


# ---- plain-torch references (the eager code of HF transformers) ------------------------


def reference_rms_norm(x, weight, eps, residual=None):
    """Returns (out, new residual or None); does not modify its inputs."""
    if residual is not None:
        residual = x + residual
        x = residual
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype), residual


def reference_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def reference_cos_sin(inv_freq: torch.Tensor, max_position: int) -> torch.Tensor:
    """float32 ``[max_position, 2, len(inv_freq)]``: cos and sin of ``position * inv_freq``
    computed as HF does (float32 product, then cos/sin)."""
    freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
    return torch.stack((freqs.cos(), freqs.sin()), dim=1).contiguous()


def reference_rotary(positions, query, key, cos_sin):
    """Returns new (query, key): ``x * cos + rotate_half(x) * sin`` in x's dtype."""
    cos = cos_sin[positions, 0].to(query.dtype)
    sin = cos_sin[positions, 1].to(query.dtype)
    cos = torch.cat((cos, cos), dim=-1)[:, None, :]
    sin = torch.cat((sin, sin), dim=-1)[:, None, :]

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin
