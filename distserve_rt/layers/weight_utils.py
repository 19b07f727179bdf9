"""How layers read their shard out of a full checkpoint tensor without loading all of it.

A "full tensor" handed to a layer's ``weight_loader`` is anything with a shape that can be
sliced along dim 0 or 1: a ``torch.Tensor``, a ``safetensors`` slice (``safe_open(...)
.get_slice(name)``, memory-mapped: slicing reads only the requested rows/columns), or a
``models.dummy_weights.DummyTensor`` (random values generated only for the slice). That is
what lets every TP rank read just its shard of a 100 GB checkpoint.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class SliceableTensor(Protocol):
    """A lazily-read full tensor (safetensors' ``PySafeSlice`` has this shape)."""

    def get_shape(self) -> list[int]: ...

    def __getitem__(self, index: Any) -> torch.Tensor: ...


FullTensor = torch.Tensor | SliceableTensor


class WeightShapeError(ValueError):
    """A checkpoint tensor's full shape differs from what the layer was built for."""

    def __init__(self, expected: tuple[int, ...], got: tuple[int, ...], what: str = "") -> None:
        self.expected, self.got = tuple(expected), tuple(got)
        where = f" ({what})" if what else ""
        super().__init__(f"shape mismatch{where}: expected {self.expected}, got {self.got}")


def full_shape(tensor: FullTensor) -> tuple[int, ...]:
    """Shape of the whole checkpoint tensor (nothing is read)."""
    if isinstance(tensor, torch.Tensor):
        return tuple(tensor.shape)
    return tuple(int(s) for s in tensor.get_shape())


def check_full_shape(tensor: FullTensor, expected: tuple[int, ...], what: str = "") -> None:
    got = full_shape(tensor)
    if got != tuple(expected):
        raise WeightShapeError(tuple(expected), got, what)


def read_slice(tensor: FullTensor, dim: int, start: int, size: int) -> torch.Tensor:
    """Rows (``dim=0``) or columns (``dim=1``) ``start:start+size`` as a tensor; only those
    are read from a lazy tensor."""
    if dim not in (0, 1):
        raise ValueError(f"dim must be 0 or 1, got {dim}")
    index = slice(start, start + size)
    return tensor[index] if dim == 0 else tensor[:, index]


def read_all(tensor: FullTensor) -> torch.Tensor:
    """The whole tensor (replicated parameters: norms, biases of row-parallel layers)."""
    if isinstance(tensor, torch.Tensor):
        return tensor
    shape = full_shape(tensor)
    return tensor[:] if shape else tensor[()]


def copy_into(param: torch.Tensor, loaded: torch.Tensor, what: str = "") -> None:
    """``param[...] = loaded`` with dtype/device conversion; the shapes must already agree."""
    if tuple(loaded.shape) != tuple(param.shape):
        raise WeightShapeError(tuple(param.shape), tuple(loaded.shape), what)
    with torch.no_grad():
        param.copy_(loaded)


def default_weight_loader(param: torch.Tensor, loaded: FullTensor, shard_id: Any = None) -> None:
    """Replicated parameter: the whole checkpoint tensor, same shape on every rank."""
    if shard_id is not None:
        raise ValueError(f"replicated parameters take no shard_id, got {shard_id!r}")
    check_full_shape(loaded, tuple(param.shape))
    copy_into(param, read_all(loaded))


def divide(numerator: int, denominator: int, what: str) -> int:
    """``numerator / denominator`` when exact; ValueError naming `what` otherwise."""
    if numerator % denominator != 0:
        raise ValueError(
            f"{what} ({numerator}) must be divisible by the tensor-parallel size "
            f"({denominator}); choose a tp_size that divides it"
        )
    return numerator // denominator
