"""Argument checks shared by the op wrappers: every message names the argument, the value
it got and what is allowed (STYLE.md, habit 7)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES_32 = (torch.int32,)
INDEX_DTYPES_64 = (torch.int64,)


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    device_of: str = "query",
    contiguous: bool = False,
) -> torch.Tensor:
    """Checks one tensor argument and returns it (typed). `device_of` names the argument
    whose device `device` is, for the message."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)} ({value.dim()})"
        )
    if dtypes is not None and value.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {value.dtype}; allowed: {_names(dtypes)}")
    if device is not None and value.device != device:
        raise ValueError(
            f"{name} is on {value.device}, it must be on {device} (the device of {device_of})"
        )
    if contiguous and not value.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous, got shape {tuple(value.shape)} "
            f"with strides {value.stride()}"
        )
    return value


def check_dim(name: str, tensor: torch.Tensor, dim: int, expected: int, what: str) -> None:
    """Checks tensor.shape[dim] == expected; `what` says where `expected` comes from."""
    if tensor.shape[dim] != expected:
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)}: dimension {dim} must be {expected} ({what})"
        )


def check_inner_contiguous(name: str, tensor: torch.Tensor, from_dim: int) -> None:
    """Dims from_dim.. must be densely packed (row-major); earlier dims may have any stride."""
    expected = 1
    for d in range(tensor.dim() - 1, from_dim - 1, -1):
        if tensor.shape[d] != 1 and tensor.stride(d) != expected:
            raise ValueError(
                f"{name} must be contiguous in dimensions {from_dim}.. "
                f"(shape {tuple(tensor.shape)}, strides {tensor.stride()})"
            )
        expected *= tensor.shape[d]


def check_head_dims(num_heads: int, num_kv_heads: int) -> None:
    if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads "
            f"({num_kv_heads}) (GQA/MQA)"
        )


MAX_HEAD_DIM = 256
"""Largest head_dim the CPU kernels take (the CUDA launchers accept 64 and 128)."""


def check_head_dim(name: str, head_dim: int) -> None:
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{name} has head_dim {head_dim}; supported: 1..{MAX_HEAD_DIM}")


def check_int(name: str, value: object, minimum: int) -> int:
    """An int >= minimum; bool is refused (True as a length is a bug, not 1)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def resolve_scale(softmax_scale: float | None, head_dim: int) -> float:
    if softmax_scale is None:
        return head_dim**-0.5
    if not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive float, got {softmax_scale!r}")
    return float(softmax_scale)


def dim0_stride(tensor: torch.Tensor, row_numel: int) -> int:
    """Elements between rows of dim 0, what native code takes as a token/block stride.

    With fewer than two rows torch may report any stride (e.g. after unsqueeze or a
    transpose); the row size is then exact and keeps the launchers' "rows do not overlap"
    checks meaningful."""
    return tensor.stride(0) if tensor.shape[0] > 1 else row_numel
