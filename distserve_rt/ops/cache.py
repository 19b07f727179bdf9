"""KV-cache ops: write the new tokens' K/V into the paged pool, copy blocks between pools.

``write_kv`` is what every attention layer does for its new tokens (prefill and decode);
``copy_blocks`` is the primitive of the KV transfer engine (one block = one request's KV for
all layers, see ``distserve_rt.core.kv_cache``) and of copy-on-write.

The wrappers check types, shapes, dtypes, devices and contiguity; the native launchers check
the ids (slots, block ids) against the pools. Both raise ValueError naming the bad argument.
On CUDA, ids inside device tensors are not checked on the host (that would cost a device
synchronisation per call): the kernels skip out-of-range ids instead of touching memory
outside the pools, and duplicate slots or destination blocks are the caller's to rule out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from distserve_rt import _native
from distserve_rt.ops._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES_64,
    check_dim,
    check_inner_contiguous,
    check_tensor,
    dim0_stride,
)


def _check_rows_contiguous(name: str, tensor: torch.Tensor) -> None:
    """Dims 1.. dense. write_kv runs per layer per step, where the generic per-dim check is
    most of the wrapper's cost, so the common contiguous case skips it."""
    if not tensor.is_contiguous():
        check_inner_contiguous(name, tensor, 1)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor | np.ndarray,
) -> None:
    """Writes the new tokens' key/value into one layer's paged KV cache, in place.

    Args:
        key: ``[num_tokens, num_kv_heads, head_dim]``; heads x dim contiguous, any token
            stride (so a slice of a packed qkv projection works without a copy).
        value: same shape, dtype and device as ``key``; its own token stride.
        kv_cache: ``[num_blocks, 2, num_kv_heads, block_size, head_dim]``, same dtype as
            ``key``; dims 1.. contiguous, dim 0 any stride (``layer_view`` of a pool).
        slot_mapping: int64 ``[num_tokens]`` (tensor or numpy array); token t goes to block
            ``slot // block_size``, offset ``slot % block_size``. Negative slots are padding
            and skipped. A slot must not appear twice (ValueError), nor be >= num_blocks *
            block_size.
    """
    if isinstance(slot_mapping, np.ndarray):  # the block manager's AppendResult.slot_mapping
        slot_mapping = torch.from_numpy(slot_mapping).to(getattr(key, "device", "cpu"))
    key = check_tensor("key", key, ndim=3, dtypes=FLOAT_DTYPES)
    device = key.device
    num_tokens, num_kv_heads, head_dim = key.shape
    value = check_tensor("value", value, ndim=3, dtypes=(key.dtype,))
    check_tensor("value", value, device=device, device_of="key")
    if value.shape != key.shape:
        raise ValueError(
            f"value has shape {tuple(value.shape)}; it must match key {tuple(key.shape)}"
        )
    kv_cache = check_tensor("kv_cache", kv_cache, ndim=5, dtypes=(key.dtype,))
    check_tensor("kv_cache", kv_cache, device=device, device_of="key")
    check_dim("kv_cache", kv_cache, 1, 2, "K and V")
    check_dim("kv_cache", kv_cache, 2, num_kv_heads, "num_kv_heads of key")
    check_dim("kv_cache", kv_cache, 4, head_dim, "head_dim of key")
    slot_mapping = check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=INDEX_DTYPES_64)
    check_tensor("slot_mapping", slot_mapping, device=device, device_of="key")
    check_dim("slot_mapping", slot_mapping, 0, num_tokens, "num_tokens of key")
    _check_rows_contiguous("key", key)
    _check_rows_contiguous("value", value)
    _check_rows_contiguous("kv_cache", kv_cache)
    if not slot_mapping.is_contiguous():
        raise ValueError(f"slot_mapping must be contiguous, got strides {slot_mapping.stride()}")
    if num_tokens == 0:
        return
    num_blocks, _, _, block_size, _ = kv_cache.shape
    token_numel = num_kv_heads * head_dim
    _native.call(
        "write_kv",
        device,
        key=key.data_ptr(),
        value=value.data_ptr(),
        kv_cache=kv_cache.data_ptr(),
        slot_mapping=slot_mapping.data_ptr(),
        num_tokens=num_tokens,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        key_token_stride=dim0_stride(key, token_numel),
        value_token_stride=dim0_stride(value, token_numel),
        num_blocks=num_blocks,
        block_size=block_size,
        kv_block_stride=dim0_stride(kv_cache, math.prod(kv_cache.shape[1:])),
        dtype=_native.dtype_code(key.dtype),
    )


def _as_block_mapping(
    block_mapping: torch.Tensor | np.ndarray | Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """The mapping as an int64 ``[num_pairs, 2]`` tensor (None when empty), and whether it
    came from the host (a list or a numpy array, such as the block manager's
    ``AppendResult.block_copies``) and still needs moving to `device`."""
    from_host = not isinstance(block_mapping, torch.Tensor)
    if isinstance(block_mapping, np.ndarray):
        block_mapping = torch.from_numpy(np.ascontiguousarray(block_mapping))
    elif from_host:
        if not isinstance(block_mapping, Sequence):
            raise ValueError(
                "block_mapping must be an int64 tensor or numpy array [num_pairs, 2] or a "
                f"list of (src, dst) pairs, got {type(block_mapping).__name__}"
            )
        if len(block_mapping) == 0:
            return None, True
        # No dtype forced: a float in the list must fail the int64 check, not be truncated.
        block_mapping = torch.tensor(block_mapping)
    mapping = check_tensor("block_mapping", block_mapping, dtypes=INDEX_DTYPES_64, contiguous=True)
    if not from_host:
        check_tensor("block_mapping", mapping, device=device, device_of="src and dst")
    if mapping.dim() != 2 or mapping.shape[1] != 2:
        raise ValueError(
            f"block_mapping must have shape [num_pairs, 2] (src block, dst block), "
            f"got {tuple(mapping.shape)}"
        )
    return (mapping if mapping.shape[0] > 0 else None), from_host


def check_block_mapping_on_host(
    mapping: torch.Tensor,  # [num_pairs, 2] int64 on the CPU
    src: torch.Tensor,
    dst: torch.Tensor,
    block_bytes: int,
) -> None:
    """The CPU launcher's id rules, for mappings headed to CUDA pools while still on the host
    (free to check there; ids already in device memory are guarded by the kernel instead):
    ids in range, each dst block written once, and no memory both read and written."""
    pairs = mapping.numpy()
    for col, name, pool in ((0, "src", src), (1, "dst", dst)):
        bad = np.flatnonzero((pairs[:, col] < 0) | (pairs[:, col] >= pool.shape[0]))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"block_mapping[{i}] = {pairs[i].tolist()}: {name} block {pairs[i, col]} is out "
                f"of range [0, {pool.shape[0]})"
            )
    dst_ids, first, counts = np.unique(pairs[:, 1], return_index=True, return_counts=True)
    if (counts > 1).any():
        block = int(dst_ids[counts > 1][0])
        rows = np.flatnonzero(pairs[:, 1] == block)[:2].tolist()
        raise ValueError(
            f"block_mapping[{rows[0]}] and block_mapping[{rows[1]}] both write dst block "
            f"{block}; each dst block may be written at most once per call"
        )
    # Byte ranges: a write that overlaps any read makes the result depend on copy order.
    src_stride = dim0_stride(src, math.prod(src.shape[1:])) * src.element_size()
    dst_stride = dim0_stride(dst, math.prod(dst.shape[1:])) * dst.element_size()
    reads = src.data_ptr() + pairs[:, 0] * src_stride
    writes = dst.data_ptr() + pairs[:, 1] * dst_stride
    reads.sort()
    # For each write, the last read starting before its end must end before it starts.
    idx = np.searchsorted(reads, writes + block_bytes, side="left") - 1
    hit = np.flatnonzero((idx >= 0) & (reads[np.maximum(idx, 0)] + block_bytes > writes))
    if hit.size:
        i = int(hit[0])
        raise ValueError(
            f"block_mapping[{i}] = {pairs[i].tolist()} writes memory that the same call reads "
            "(src and dst share storage); the copy order would decide the result"
        )


def copy_blocks(
    src: torch.Tensor,
    dst: torch.Tensor,
    block_mapping: torch.Tensor | Sequence[Sequence[int]],
) -> None:
    """Copies blocks of `src` into blocks of `dst`, bit for bit: ``dst[d] = src[s]`` for each
    row ``(s, d)`` of `block_mapping`, all in one call.

    Args:
        src: a pool whose dim 0 indexes blocks, e.g. ``[num_blocks, num_layers, 2,
            num_kv_heads, block_size, head_dim]``; each block (dims 1..) contiguous, dim 0
            any stride.
        dst: the same per-block shape and dtype as `src`, on the same device (cpu -> cpu or
            cuda -> cuda on one device); may be `src` itself or share its memory.
        block_mapping: int64 ``[num_pairs, 2]`` on the pools' device, or on the host as a
            numpy array or a list of ``(src, dst)`` pairs. Ids must be in range and each dst
            block written at most once; when src and dst share memory, no block may be both
            read and written (the copy order would decide the result). ValueError otherwise,
            except for CUDA ids already in device memory: the kernel skips out-of-range ids.
            Empty: nothing happens.
    """
    src = check_tensor("src", src)
    dst = check_tensor("dst", dst)
    if src.dim() < 1 or dst.dim() < 1:
        raise ValueError(
            f"src and dst must have a block dimension (dim 0), got shapes "
            f"{tuple(src.shape)} and {tuple(dst.shape)}"
        )
    if dst.dtype != src.dtype:
        raise ValueError(f"dst has dtype {dst.dtype}; it must match src ({src.dtype})")
    if dst.shape[1:] != src.shape[1:]:
        raise ValueError(
            f"dst blocks have shape {tuple(dst.shape[1:])}; they must match the blocks of src "
            f"{tuple(src.shape[1:])} (pools {tuple(src.shape)} and {tuple(dst.shape)})"
        )
    if dst.device != src.device:
        raise ValueError(
            f"dst is on {dst.device} and src on {src.device}; copy_blocks copies within one "
            "device (cpu -> cpu, or cuda -> cuda on the same device)"
        )
    _check_rows_contiguous("src", src)
    _check_rows_contiguous("dst", dst)
    mapping, from_host = _as_block_mapping(block_mapping, src.device)
    if mapping is None:
        return
    block_numel = math.prod(src.shape[1:])
    element_size = src.element_size()
    if from_host and src.device.type != "cpu":
        # On CPU the launcher checks the ids; for a device they are only free to check here.
        check_block_mapping_on_host(mapping, src, dst, block_numel * element_size)
    mapping = mapping.to(src.device)
    _native.call(
        "copy_blocks",
        src.device,
        src=src.data_ptr(),
        dst=dst.data_ptr(),
        block_mapping=mapping.data_ptr(),
        num_pairs=mapping.shape[0],
        src_num_blocks=src.shape[0],
        dst_num_blocks=dst.shape[0],
        src_block_stride_bytes=dim0_stride(src, block_numel) * element_size,
        dst_block_stride_bytes=dim0_stride(dst, block_numel) * element_size,
        block_bytes=block_numel * element_size,
    )


def reference_write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Plain-torch ``write_kv``: one token at a time, in place, no checks."""
    block_size = kv_cache.shape[3]
    for token, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        block, offset = divmod(slot, block_size)
        kv_cache[block, 0, :, offset, :] = key[token]
        kv_cache[block, 1, :, offset, :] = value[token]


def reference_copy_blocks(
    src: torch.Tensor,
    dst: torch.Tensor,
    block_mapping: torch.Tensor | Sequence[Sequence[int]],
) -> None:
    """Plain-torch ``copy_blocks``: one block at a time in mapping order, in place."""
    pairs = block_mapping.tolist() if isinstance(block_mapping, torch.Tensor) else block_mapping
    for src_block, dst_block in pairs:
        dst[dst_block] = src[src_block]
