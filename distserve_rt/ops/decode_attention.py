"""Paged decode attention: one new query token per sequence over its cached K/V.

The kernels (CPU: ``include/distserve_rt/cpu/decode_attention.h``) read the KV cache block by
block through ``block_table``, one work item per (sequence, kv head, split) computing all the
query heads of that kv head's GQA group, and split long contexts across threads
(flash-decoding) with a scratch workspace this wrapper allocates.
"""

from __future__ import annotations

import math

import torch

from distserve_rt import _native
from distserve_rt.ops._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES_32,
    check_dim,
    check_head_dim,
    check_head_dims,
    check_inner_contiguous,
    check_int,
    check_tensor,
    dim0_stride,
    resolve_scale,
)


def decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    max_seq_len: int | None = None,
    softmax_scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of each sequence's current token to its ``seq_lens[i]`` cached tokens.

    Args:
        query: ``[batch, num_heads, head_dim]`` float32/float16/bfloat16; dims 1.. contiguous.
        kv_cache: one layer's ``[num_blocks, 2, num_kv_heads, block_size, head_dim]`` (e.g.
            ``layer_view(pool, layer)``), same dtype and device; dims 1.. contiguous, dim 0
            may have any stride. The current token's K/V must already be written.
        block_table: ``[batch, max_blocks_per_seq]`` int32, contiguous: token ``p`` of
            sequence ``i`` is in block ``block_table[i, p // block_size]`` at offset
            ``p % block_size``.
        seq_lens: ``[batch]`` int32, contiguous, each in ``[1, max_seq_len]``.
        max_seq_len: upper bound of ``seq_lens`` (sizes the splits and the workspace). Default:
            ``seq_lens.max()`` on CPU; on CUDA the block table's capacity
            ``max_blocks_per_seq * block_size``, which needs no device sync.
        softmax_scale: defaults to ``head_dim ** -0.5``.
        out: optional ``[batch, num_heads, head_dim]`` result tensor (dims 1.. contiguous).

    Query head ``h`` attends with kv head ``h // (num_heads // num_kv_heads)`` (GQA/MQA).
    Returns ``out`` (allocated like ``query`` when not given). Raises ValueError on bad
    arguments; on CPU that includes ``seq_lens`` and the block ids they use.
    """
    _check_inputs(query, kv_cache, block_table, seq_lens)
    device = query.device
    batch, num_heads, head_dim = query.shape
    num_blocks, _, num_kv_heads, block_size, _ = kv_cache.shape
    out = _check_or_make_out(out, query)
    scale = resolve_scale(softmax_scale, head_dim)
    if batch == 0:
        return out
    max_blocks_per_seq = block_table.shape[1]
    max_seq_len = _resolve_max_seq_len(max_seq_len, seq_lens, max_blocks_per_seq * block_size)

    workspace_bytes = _native.call(
        "decode_attention_workspace_bytes",
        device,
        batch=batch,
        num_heads=num_heads,
        head_dim=head_dim,
        max_seq_len=max_seq_len,
    )
    # [workspace_bytes] scratch for the split partials (fp32 rows), owned by this call
    workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
    _native.call(
        "decode_attention",
        device,
        query=query.data_ptr(),
        out=out.data_ptr(),
        kv_cache=kv_cache.data_ptr(),
        block_table=block_table.data_ptr(),
        seq_lens=seq_lens.data_ptr(),
        workspace=_native.ptr(workspace) if workspace_bytes > 0 else 0,
        workspace_bytes=workspace_bytes,
        batch=batch,
        max_seq_len=max_seq_len,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        query_stride=dim0_stride(query, num_heads * head_dim),
        out_stride=dim0_stride(out, num_heads * head_dim),
        softmax_scale=scale,
        num_blocks=num_blocks,
        block_size=block_size,
        kv_block_stride=dim0_stride(kv_cache, math.prod(kv_cache.shape[1:])),
        max_blocks_per_seq=max_blocks_per_seq,
        dtype=_native.dtype_code(query.dtype),
    )
    return out


def _check_inputs(query: object, kv_cache: object, block_table: object, seq_lens: object) -> None:
    query = check_tensor("query", query, ndim=3, dtypes=FLOAT_DTYPES)
    device = query.device
    batch, num_heads, head_dim = query.shape
    check_inner_contiguous("query", query, 1)
    check_head_dim("query", head_dim)
    kv_cache = check_tensor("kv_cache", kv_cache, ndim=5, device=device)
    _check_same_dtype("kv_cache", kv_cache, query)
    check_dim("kv_cache", kv_cache, 1, 2, "K and V")
    check_dim("kv_cache", kv_cache, 4, head_dim, "head_dim of query")
    check_inner_contiguous("kv_cache", kv_cache, 1)
    check_head_dims(num_heads, kv_cache.shape[2])
    for name, tensor, ndim in (("block_table", block_table, 2), ("seq_lens", seq_lens, 1)):
        tensor = check_tensor(
            name, tensor, ndim=ndim, dtypes=INDEX_DTYPES_32, device=device, contiguous=True
        )
        check_dim(name, tensor, 0, batch, "batch of query")


def _check_same_dtype(name: str, tensor: torch.Tensor, query: torch.Tensor) -> None:
    if tensor.dtype != query.dtype:
        raise ValueError(f"{name} has dtype {tensor.dtype}; it must match query ({query.dtype})")


def _check_or_make_out(out: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty_like(query, memory_format=torch.contiguous_format)
    out = check_tensor("out", out, ndim=3, device=query.device)
    _check_same_dtype("out", out, query)
    if out.shape != query.shape:
        raise ValueError(
            f"out has shape {tuple(out.shape)}; it must match query {tuple(query.shape)}"
        )
    check_inner_contiguous("out", out, 1)
    return out


def _resolve_max_seq_len(max_seq_len: int | None, seq_lens: torch.Tensor, capacity: int) -> int:
    if max_seq_len is None:
        if seq_lens.device.type == "cpu":
            # Below 1 is a bad seq_lens entry: pass 1 and let the launcher name the entry.
            return max(1, int(seq_lens.max()))
        return capacity
    return check_int("max_seq_len", max_seq_len, 1)


def reference_decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Plain-torch decode attention in float32, one sequence and one head at a time.

    Same arguments as :func:`decode_attention`; returns ``[batch, num_heads, head_dim]``
    float32. Slow and obvious on purpose: it is what the kernels are tested against.
    """
    batch, num_heads, head_dim = query.shape
    _, _, num_kv_heads, block_size, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    out = torch.empty(batch, num_heads, head_dim, dtype=torch.float32, device=query.device)
    for i in range(batch):
        positions = torch.arange(int(seq_lens[i]), device=query.device)
        blocks = block_table[i, positions // block_size].long()
        offsets = positions % block_size
        # [num_kv_heads, seq_len, head_dim], gathered token by token from the paged cache
        key = kv_cache[blocks, 0, :, offsets, :].float().transpose(0, 1)
        value = kv_cache[blocks, 1, :, offsets, :].float().transpose(0, 1)
        for h in range(num_heads):
            scores = (key[h // group] @ query[i, h].float()) * scale  # [seq_len]
            probs = torch.softmax(scores, dim=0)
            out[i, h] = probs @ value[h // group]
    return out
