"""Prefill attention: causal attention of a varlen batch of new tokens, with GQA, an optional
paged prefix (chunked prefill) and an optional fused write of the new K/V into the cache.

The native kernels (CPU: ``include/distserve_rt/cpu/prefill_attention.h``) take pointers and
strides; this wrapper checks everything a caller can get wrong about types, shapes, dtypes
and devices. Values inside index tensors (cu_seqlens, prefix_lens, block ids, slot ids) are
checked by the CPU launcher; the CUDA kernels skip out-of-range ids instead (no device sync).
"""

from __future__ import annotations

import math

import torch

from distserve_rt import _native
from distserve_rt.ops._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES_32,
    INDEX_DTYPES_64,
    check_dim,
    check_head_dim,
    check_head_dims,
    check_inner_contiguous,
    check_int,
    check_tensor,
    dim0_stride,
    resolve_scale,
)
from distserve_rt.ops.cache import reference_write_kv


def prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    max_seqlen: int | None = None,
    softmax_scale: float | None = None,
    kv_cache: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    prefix_lens: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of the new tokens of a varlen batch; returns ``out``.

    Args:
        query: ``[num_tokens, num_heads, head_dim]``; heads x dim contiguous, any token
            stride (a slice of a packed qkv projection works without a copy).
        key, value: ``[num_tokens, num_kv_heads, head_dim]``, same layout rule. Query head
            ``h`` uses kv head ``h // (num_heads // num_kv_heads)`` (GQA/MQA).
        cu_seqlens: int32 ``[batch + 1]``; sequence ``i`` owns rows
            ``cu_seqlens[i]:cu_seqlens[i + 1]``.
        max_seqlen: upper bound of the new tokens per sequence; computed from cu_seqlens
            when None (a device sync on CUDA: pass it on the hot path).
        softmax_scale: defaults to ``head_dim ** -0.5``.
        kv_cache: one layer's paged cache ``[num_blocks, 2, num_kv_heads, block_size,
            head_dim]`` (dims 1.. contiguous, e.g. ``layer_view(pool, layer)``), same dtype
            as query. Needed for ``prefix_lens`` and ``slot_mapping``.
        block_table: int32 ``[batch, max_blocks_per_seq]``, with ``prefix_lens``.
        prefix_lens: int32 ``[batch]``: sequence ``i``'s new tokens sit at positions
            ``prefix_lens[i] + j`` and also attend to the prefix tokens
            ``0 .. prefix_lens[i] - 1`` read from ``kv_cache`` through ``block_table``.
        slot_mapping: int64 ``[num_tokens]``: if given, the new K/V are written to these
            slots (``block * block_size + offset``; negative = padding, skipped) before
            attending, exactly as ``write_kv`` followed by this op.
        out: ``[num_tokens, num_heads, head_dim]`` to write into (heads x dim contiguous);
            allocated when None.

    Dtypes: float32, float16 or bfloat16 for query, key, value, kv_cache and out alike;
    accumulation is in fp32. The CPU kernel uses a temporary fp32 copy of the new K/V
    (8 * num_tokens * num_kv_heads * head_dim bytes).
    """
    query, key, value = _check_qkv(query, key, value)
    device, dtype = query.device, query.dtype
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    cu_seqlens = _check_index("cu_seqlens", cu_seqlens, 1, INDEX_DTYPES_32, device)
    if cu_seqlens.shape[0] < 1:
        raise ValueError("cu_seqlens must have batch + 1 >= 1 elements, got 0")
    batch = cu_seqlens.shape[0] - 1
    if max_seqlen is None:
        max_seqlen = _default_max_seqlen(cu_seqlens, num_tokens)
    else:
        check_int("max_seqlen", max_seqlen, 0)
    scale = resolve_scale(softmax_scale, head_dim)
    cache = _check_cache_args(kv_cache, block_table, prefix_lens, slot_mapping, query, key, batch)
    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    else:
        out = check_tensor("out", out, ndim=3, dtypes=(dtype,), device=device)
        if out.shape != query.shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(query.shape)}")
        _check_token_rows("out", out)
    _native.call(
        "prefill_attention",
        device,
        query=query.data_ptr(),
        key=key.data_ptr(),
        value=value.data_ptr(),
        out=out.data_ptr(),
        cu_seqlens=cu_seqlens.data_ptr(),
        batch=batch,
        num_tokens=num_tokens,
        max_seqlen_q=max_seqlen,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        query_token_stride=dim0_stride(query, num_heads * head_dim),
        key_token_stride=dim0_stride(key, num_kv_heads * head_dim),
        value_token_stride=dim0_stride(value, num_kv_heads * head_dim),
        out_token_stride=dim0_stride(out, num_heads * head_dim),
        softmax_scale=scale,
        **cache,
        dtype=_native.dtype_code(dtype),
    )
    return out


def _check_qkv(
    query: object, key: object, value: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """query [num_tokens, num_heads, head_dim], key/value [num_tokens, num_kv_heads,
    head_dim]: same dtype and device, a supported device, GQA head counts."""
    query = check_tensor("query", query, ndim=3, dtypes=FLOAT_DTYPES)
    _native.module_for(query.device)  # unsupported device: ValueError before any work on it
    num_tokens, num_heads, head_dim = query.shape
    key = _check_like_query("key", key, query)
    value = _check_like_query("value", value, query)
    check_head_dims(num_heads, key.shape[1])
    check_head_dim("query", head_dim)
    for name, tensor in (("key", key), ("value", value)):
        check_dim(name, tensor, 0, num_tokens, "num_tokens of query")
        check_dim(name, tensor, 2, head_dim, "head_dim of query")
    check_dim("value", value, 1, key.shape[1], "num_kv_heads of key")
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        _check_token_rows(name, tensor)
    return query, key, value


def _check_token_rows(name: str, tensor: torch.Tensor) -> None:
    """Each token's [heads, head_dim] is dense and tokens do not overlap (any larger token
    stride is fine: slices of a packed qkv tensor need no copy)."""
    check_inner_contiguous(name, tensor, 1)
    row = tensor.shape[1] * tensor.shape[2]
    if tensor.shape[0] > 1 and tensor.stride(0) < row:
        raise ValueError(
            f"{name} has token stride {tensor.stride(0)} < num_heads * head_dim = {row} "
            f"(shape {tuple(tensor.shape)}, strides {tensor.stride()}): rows would overlap"
        )


def _default_max_seqlen(cu_seqlens: torch.Tensor, num_tokens: int) -> int:
    """The exact longest sequence on CPU; on a device, num_tokens: a valid upper bound that
    needs no device synchronisation (pass max_seqlen to size the CUDA grid exactly)."""
    if cu_seqlens.device.type != "cpu" or cu_seqlens.shape[0] < 2:
        return num_tokens
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def _check_index(
    name: str, tensor: object, ndim: int, dtypes: tuple[torch.dtype, ...], device: torch.device
) -> torch.Tensor:
    return check_tensor(name, tensor, ndim=ndim, dtypes=dtypes, device=device, contiguous=True)


def _check_like_query(name: str, tensor: object, query: torch.Tensor) -> torch.Tensor:
    return check_tensor(name, tensor, ndim=3, dtypes=(query.dtype,), device=query.device)


# The paged-cache keywords of a call without a kv_cache: null pointers, sizes unused.
_NO_CACHE: dict[str, int] = dict.fromkeys(
    (
        "kv_cache",
        "block_table",
        "prefix_lens",
        "slot_mapping",
        "num_blocks",
        "block_size",
        "kv_block_stride",
        "max_blocks_per_seq",
    ),
    0,
)


def _check_cache_args(
    kv_cache: torch.Tensor | None,
    block_table: torch.Tensor | None,
    prefix_lens: torch.Tensor | None,
    slot_mapping: torch.Tensor | None,
    query: torch.Tensor,
    key: torch.Tensor,
    batch: int,
) -> dict[str, int]:
    """Checks the paged-cache arguments; returns the native call's keywords for them
    (kv_cache, block_table, prefix_lens, slot_mapping, num_blocks, block_size,
    kv_block_stride, max_blocks_per_seq), all 0 without a kv_cache."""
    device = query.device
    if kv_cache is None:
        for name, arg in (
            ("block_table", block_table),
            ("prefix_lens", prefix_lens),
            ("slot_mapping", slot_mapping),
        ):
            if arg is not None:
                raise ValueError(f"{name} was given without kv_cache, which it indexes")
        return _NO_CACHE
    kv_cache = check_tensor("kv_cache", kv_cache, ndim=5, dtypes=(query.dtype,), device=device)
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    check_dim("kv_cache", kv_cache, 1, 2, "K and V")
    check_dim("kv_cache", kv_cache, 2, num_kv_heads, "num_kv_heads of key")
    check_dim("kv_cache", kv_cache, 4, head_dim, "head_dim of key")
    check_inner_contiguous("kv_cache", kv_cache, 1)
    num_blocks, block_size = kv_cache.shape[0], kv_cache.shape[3]
    if (block_table is None) != (prefix_lens is None):
        raise ValueError(
            "block_table and prefix_lens must be given together (block_table is "
            f"{'None' if block_table is None else 'given'}, prefix_lens is "
            f"{'None' if prefix_lens is None else 'given'})"
        )
    max_blocks_per_seq = 0
    if block_table is not None:
        block_table = _check_index("block_table", block_table, 2, INDEX_DTYPES_32, device)
        prefix_lens = _check_index("prefix_lens", prefix_lens, 1, INDEX_DTYPES_32, device)
        check_dim("block_table", block_table, 0, batch, "batch = len(cu_seqlens) - 1")
        check_dim("prefix_lens", prefix_lens, 0, batch, "batch = len(cu_seqlens) - 1")
        max_blocks_per_seq = block_table.shape[1]
        if max_blocks_per_seq < 1:
            raise ValueError(f"block_table has shape {tuple(block_table.shape)}: no columns")
    if slot_mapping is not None:
        slot_mapping = _check_index("slot_mapping", slot_mapping, 1, INDEX_DTYPES_64, device)
        check_dim("slot_mapping", slot_mapping, 0, key.shape[0], "num_tokens of query")
    return {
        "kv_cache": kv_cache.data_ptr(),
        "block_table": _native.ptr(block_table),
        "prefix_lens": _native.ptr(prefix_lens),
        "slot_mapping": _native.ptr(slot_mapping),
        "num_blocks": num_blocks,
        "block_size": block_size,
        "kv_block_stride": dim0_stride(kv_cache, math.prod(kv_cache.shape[1:])),
        "max_blocks_per_seq": max_blocks_per_seq,
    }


def reference_prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    kv_cache: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    prefix_lens: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch prefill attention in fp32 (readable loops, for tests); same arguments
    and semantics as :func:`prefill_attention`, including the write through slot_mapping.
    Returns ``[num_tokens, num_heads, head_dim]`` in query's dtype."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    group = num_heads // key.shape[1]
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    if slot_mapping is not None:
        reference_write_kv(key, value, kv_cache, slot_mapping)
    out = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    bounds = cu_seqlens.tolist()
    for i in range(len(bounds) - 1):
        start, end = bounds[i], bounds[i + 1]
        keys, values = key[start:end].float(), value[start:end].float()
        prefix_len = 0 if prefix_lens is None else int(prefix_lens[i])
        if prefix_len > 0:
            prefix_k, prefix_v = _gather_prefix(kv_cache, block_table[i], prefix_len)
            keys, values = torch.cat([prefix_k, keys]), torch.cat([prefix_v, values])
        keys = keys.repeat_interleave(group, dim=1)  # [num_keys, num_heads, head_dim]
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", query[start:end].float(), keys) * scale
        q_pos = prefix_len + torch.arange(end - start, device=query.device)
        k_pos = torch.arange(keys.shape[0], device=query.device)
        scores.masked_fill_(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), values)
    return out.to(query.dtype)


def _gather_prefix(
    kv_cache: torch.Tensor, block_table_row: torch.Tensor, prefix_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix K and V ``[prefix_len, num_kv_heads, head_dim]`` in fp32, token by token."""
    block_size = kv_cache.shape[3]
    keys, values = [], []
    for pos in range(prefix_len):
        block = int(block_table_row[pos // block_size])
        keys.append(kv_cache[block, 0, :, pos % block_size].float())
        values.append(kv_cache[block, 1, :, pos % block_size].float())
    return torch.stack(keys), torch.stack(values)
