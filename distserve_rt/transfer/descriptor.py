"""What a transfer is about: the peer's pool (`PoolDescriptor`, sent once), the local pool
(`PoolGeometry`), the part of each block that moves (`KVSlice`), and the checks every
backend applies before anything is copied.

Pools are block-major, ``[num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]``
(see ``distserve_rt.core.kv_cache``): one block is one request's KV for every layer.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class PoolDescriptor:
    """What a consumer needs to open a producer's pool: small, sent once per peer.

    ``to_bytes`` / ``from_bytes`` give a compact JSON form for pipes and sockets.
    """

    transport: str
    """Name of the backend that exported it (``shm``, ``cuda_ipc``, ``fake``)."""
    handle: str
    """Backend-specific: shm region name, hex CUDA IPC memory handle, or fake registry key."""
    offset_bytes: int
    """Where the pool starts inside the shared allocation."""
    region_bytes: int
    """Bytes of the shared allocation (what the consumer maps)."""
    num_blocks: int
    num_layers: int
    num_kv_heads: int
    block_size: int
    head_dim: int
    dtype: str
    """torch dtype name without the prefix: ``float32``, ``float16``, ``bfloat16``."""
    block_stride_bytes: int
    owner_pid: int
    device_index: int = -1
    """CUDA device of the pool in the owner process; -1 for host memory."""
    event_handle: str = ""
    """cuda_ipc: hex IPC event handle the producer records after writing blocks."""

    def __post_init__(self) -> None:
        for name in ("num_blocks", "num_layers", "num_kv_heads", "block_size", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PoolDescriptor.{name} must be a positive int, got {value!r}")
        if self.offset_bytes < 0 or self.region_bytes < 1:
            raise ValueError(
                f"PoolDescriptor offset_bytes/region_bytes must be >= 0/>= 1, got "
                f"{self.offset_bytes}/{self.region_bytes}"
            )
        if self.dtype not in _DTYPES:
            raise ValueError(
                f"PoolDescriptor.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def head_bytes(self) -> int:
        """One (layer, K|V, head) run of a block: block_size * head_dim elements."""
        return self.block_size * self.head_dim * _element_size(self.torch_dtype)

    @property
    def key(self) -> tuple[str, str, int]:
        """Identity of the pool (what consumers cache mappings by)."""
        return (self.transport, self.handle, self.offset_bytes)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> PoolDescriptor:
        return cls(**json.loads(data.decode()))


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


_ELEMENT_SIZES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def _element_size(dtype: torch.dtype) -> int:
    return _ELEMENT_SIZES[dtype]  # a table: this runs on every submit


def describe_pool(
    pool: torch.Tensor, *, transport: str, handle: str, offset_bytes: int, region_bytes: int
) -> PoolDescriptor:
    """A descriptor for `pool` ``[num_blocks, num_layers, 2, num_kv_heads, block_size,
    head_dim]`` (each block contiguous) living in a shared allocation."""
    check_pool("pool", pool)
    num_blocks, num_layers, _, num_kv_heads, block_size, head_dim = pool.shape
    return PoolDescriptor(
        transport=transport,
        handle=handle,
        offset_bytes=offset_bytes,
        region_bytes=region_bytes,
        num_blocks=num_blocks,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        block_size=block_size,
        head_dim=head_dim,
        dtype=str(pool.dtype).removeprefix("torch."),
        block_stride_bytes=pool.stride(0) * pool.element_size(),
        owner_pid=os.getpid(),
        device_index=pool.device.index if pool.device.type == "cuda" else -1,
    )


def check_pool(name: str, pool: torch.Tensor) -> None:
    """ValueError unless `pool` is a KV pool ``[num_blocks, num_layers, 2, num_kv_heads,
    block_size, head_dim]`` whose blocks (dims 1..) are contiguous."""
    if not isinstance(pool, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(pool).__name__}")
    if pool.dim() != 6 or pool.shape[2] != 2 or pool.shape[0] < 1:
        raise ValueError(
            f"{name} must have shape [num_blocks, num_layers, 2, num_kv_heads, block_size, "
            f"head_dim] with num_blocks >= 1, got {tuple(pool.shape)}"
        )
    if pool.dtype not in _DTYPES.values():
        raise ValueError(f"{name} dtype must be one of {list(_DTYPES.values())}, got {pool.dtype}")
    expected = 1
    for dim in range(5, 0, -1):
        if pool.shape[dim] != 1 and pool.stride(dim) != expected:
            raise ValueError(
                f"{name} blocks (dims 1..) must be contiguous, got strides {pool.stride()}"
            )
        expected *= pool.shape[dim]
    if pool.stride(0) < math.prod(pool.shape[1:]):
        raise ValueError(f"{name} blocks overlap: stride(0) = {pool.stride(0)}")


# (src_layer_start, dst_layer_start, num_layers, src_head_start, dst_head_start, num_heads)
SliceArgs = tuple[int, int, int, int, int, int]


@dataclass(frozen=True, slots=True)
class KVSlice:
    """The part of each block a transfer moves, for instances with different parallelism.

    Source layers ``[src_layer_start, +num_layers)`` land on destination layers
    ``[dst_layer_start, +num_layers)``; KV heads likewise. ``None`` counts mean "all of the
    source from the start", which with zero starts is a whole-block copy. Example: prefill
    TP 1 (8 KV heads) to decode TP 2 (4 per rank): rank 1 pulls
    ``KVSlice(src_head_start=4, num_heads=4)``.
    """

    src_layer_start: int = 0
    dst_layer_start: int = 0
    num_layers: int | None = None
    src_head_start: int = 0
    dst_head_start: int = 0
    num_heads: int | None = None

    def __post_init__(self) -> None:
        for name in ("src_layer_start", "dst_layer_start", "src_head_start", "dst_head_start"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"KVSlice.{name} must be an int >= 0, got {value!r}")
        for name in ("num_layers", "num_heads"):
            value = getattr(self, name)
            bad = not isinstance(value, int) or isinstance(value, bool) or value < 1
            if value is not None and bad:
                raise ValueError(f"KVSlice.{name} must be None or an int >= 1, got {value!r}")

    def resolve(self, src: PoolDescriptor, dst: PoolGeometry) -> SliceArgs:
        """Concrete ``(src_layer_start, dst_layer_start, num_layers, src_head_start,
        dst_head_start, num_heads)``; ValueError when a range leaves either pool."""
        num_layers = self.num_layers
        if num_layers is None:
            num_layers = src.num_layers - self.src_layer_start
        num_heads = self.num_heads
        if num_heads is None:
            num_heads = src.num_kv_heads - self.src_head_start
        ranges = (
            ("source layers", self.src_layer_start, num_layers, src.num_layers),
            ("destination layers", self.dst_layer_start, num_layers, dst.num_layers),
            ("source KV heads", self.src_head_start, num_heads, src.num_kv_heads),
            ("destination KV heads", self.dst_head_start, num_heads, dst.num_kv_heads),
        )
        for what, start, count, size in ranges:
            if count < 1 or start + count > size:
                raise ValueError(
                    f"{self}: {what} [{start}, {start + count}) do not fit the pool's {size}"
                )
        return (self.src_layer_start, self.dst_layer_start, num_layers,
                self.src_head_start, self.dst_head_start, num_heads)  # fmt: skip


WHOLE_BLOCKS = KVSlice()
"""The default slice: every layer and head of the source, at the same positions."""


@dataclass(frozen=True, slots=True)
class PoolGeometry:
    """The local (destination) pool as a transfer sees it."""

    num_blocks: int
    num_layers: int
    num_kv_heads: int
    block_size: int
    head_dim: int
    dtype: torch.dtype
    block_stride_bytes: int

    @classmethod
    def of(cls, pool: torch.Tensor) -> PoolGeometry:
        """Checks `pool` (`check_pool`) and describes it; cached per pool layout, since
        transports call it on every submit."""
        # The layout decides everything here (not the address), so equal pools share it.
        is_tensor = isinstance(pool, torch.Tensor)
        key = (pool.shape, pool.stride(), pool.dtype) if is_tensor else None
        geometry = _GEOMETRY_CACHE.get(key)
        if geometry is None:
            geometry = cls._describe(pool)
            if len(_GEOMETRY_CACHE) >= 64:  # pools are few and long-lived: a small table
                _GEOMETRY_CACHE.clear()
            _GEOMETRY_CACHE[key] = geometry
        return geometry

    @classmethod
    def _describe(cls, pool: torch.Tensor) -> PoolGeometry:
        check_pool("dst_pool", pool)
        num_blocks, num_layers, _, num_kv_heads, block_size, head_dim = pool.shape
        return cls(num_blocks, num_layers, num_kv_heads, block_size, head_dim, pool.dtype,
                   pool.stride(0) * pool.element_size())  # fmt: skip

    def as_tuple(self) -> tuple[int, int, int, int]:
        """What the native engines take: (num_blocks, num_layers, num_kv_heads, stride)."""
        return (self.num_blocks, self.num_layers, self.num_kv_heads, self.block_stride_bytes)


_GEOMETRY_CACHE: dict[tuple, PoolGeometry] = {}


def check_compatible(src: PoolDescriptor, dst: PoolGeometry) -> None:
    """Same dtype, block_size and head_dim: a transfer copies bytes, it never converts."""
    for name in ("block_size", "head_dim"):
        if getattr(src, name) != getattr(dst, name):
            raise ValueError(
                f"the peer pool has {name} {getattr(src, name)} and the local pool "
                f"{getattr(dst, name)}; transfers need them equal"
            )
    if src.torch_dtype != dst.dtype:
        raise ValueError(
            f"the peer pool has dtype {src.torch_dtype} and the local pool {dst.dtype}; "
            "transfers copy bytes and need them equal"
        )


def block_mapping(
    src_block_ids: Sequence[int] | np.ndarray | torch.Tensor,
    dst_block_ids: Sequence[int] | np.ndarray | torch.Tensor,
    src_num_blocks: int,
    dst_num_blocks: int,
    check_ids: bool = True,
) -> np.ndarray:
    """int64 ``[num_pairs, 2]`` (src, dst), contiguous.

    With `check_ids`, the rules every backend applies before anything is copied: ids in
    range (ValueError naming the id and the pool size) and each dst block written at most
    once. The native engines check the same rules, with the same words, in C++
    (csrc/common/transfer_checks.h), so their transports pass ``check_ids=False`` rather
    than pay for the checks twice on the per-request path.
    """
    src = _as_ids("src_block_ids", src_block_ids)
    dst = _as_ids("dst_block_ids", dst_block_ids)
    if src.shape != dst.shape:
        raise ValueError(
            f"src_block_ids has {src.size} ids and dst_block_ids {dst.size}; they pair up "
            "one to one"
        )
    mapping = np.empty((src.size, 2), dtype=np.int64)
    mapping[:, 0] = src
    mapping[:, 1] = dst
    if check_ids:
        _check_ids(mapping, src_num_blocks, dst_num_blocks)
    return mapping


def _check_ids(mapping: np.ndarray, src_num_blocks: int, dst_num_blocks: int) -> None:
    for col, name, which, size in (
        (0, "src", "source", src_num_blocks),
        (1, "dst", "destination", dst_num_blocks),
    ):
        ids = mapping[:, col]
        bad = np.flatnonzero((ids < 0) | (ids >= size))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"{name} block id {int(ids[i])} (pair {i}) is out of range: the {which} pool "
                f"has {size} blocks"
            )
    order = np.argsort(mapping[:, 1], kind="stable")
    dst_sorted = mapping[order, 1]
    twice = np.flatnonzero(dst_sorted[1:] == dst_sorted[:-1])
    if twice.size:
        k = int(twice[0])
        raise ValueError(
            f"pairs {int(order[k])} and {int(order[k + 1])} both write dst block "
            f"{int(dst_sorted[k])}; each dst block may be written at most once per transfer"
        )


def _as_ids(name: str, ids: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    array = np.asarray(ids if isinstance(ids, np.ndarray | list | tuple) else list(ids))
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ValueError(
            f"{name} must be a 1-D sequence of integer block ids, got dtype {array.dtype} "
            f"shape {array.shape}"
        )
    return array.astype(np.int64, copy=False)


@dataclass(frozen=True, slots=True)
class SubmitPlan:
    """What every backend derives from a `KVTransport.submit` call before copying."""

    geometry: PoolGeometry
    slice_args: SliceArgs
    mapping: np.ndarray
    """int64 ``[num_pairs, 2]`` (src, dst) block ids."""
    num_bytes: int
    """Bytes the transfer moves: K and V of the sliced layers and heads of every pair."""


def plan_submit(
    src: PoolDescriptor,
    dst_pool: torch.Tensor,
    src_block_ids: Sequence[int] | np.ndarray | torch.Tensor,
    dst_block_ids: Sequence[int] | np.ndarray | torch.Tensor,
    kv_slice: KVSlice | None,
    check_ids: bool = True,
) -> SubmitPlan:
    """Checks the pools fit each other and resolves the slice and the block pairs (ids are
    checked here unless `check_ids` is False, for engines that check them natively)."""
    geometry = PoolGeometry.of(dst_pool)
    check_compatible(src, geometry)
    slice_args = (kv_slice or WHOLE_BLOCKS).resolve(src, geometry)
    mapping = block_mapping(
        src_block_ids, dst_block_ids, src.num_blocks, geometry.num_blocks, check_ids=check_ids
    )
    _, _, num_layers, _, _, num_heads = slice_args
    num_bytes = 2 * num_layers * num_heads * src.head_bytes * mapping.shape[0]
    return SubmitPlan(geometry, slice_args, mapping, num_bytes)
