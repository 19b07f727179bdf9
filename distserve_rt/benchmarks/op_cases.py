"""Op microbenchmark cases: our kernel and a torch baseline on the same data.

Each case is checked against an fp32 reference on fresh random inputs before it is timed
(BENCHMARKS.md: relative error below 1e-4 for fp32, 1e-2 for bf16/fp16; NaN never passes),
and reports a ratio measured in the same process: baseline time / our time (> 1 = faster).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from distserve_rt import ops
from distserve_rt.core.kv_cache import KVCacheSpec, allocate_kv_pool, layer_view


@dataclass
class OpCase:
    """One benchmarked op at one shape."""

    op: str
    params: dict[str, object]
    ours: Callable[[], object]
    baseline: Callable[[], object]
    baseline_name: str
    check: Callable[[], float]
    """Relative error ||ours - ref|| / ||ref|| against an fp32 reference."""
    tolerance: float
    bytes_moved: int = 0
    """Bytes read + written by one call (for GB/s)."""
    flops: int = 0
    """Floating-point operations of one call (for GFLOP/s)."""
    memory_bound: bool = False
    """Report GB/s rather than GFLOP/s (decode attention reads every KV byte once)."""
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def label(self) -> str:
        inner = " ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.op} [{inner}]"


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    err = (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item()
    return float("inf") if math.isnan(err) else err


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 1e-2


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _rand(shape, dtype, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


def decode_attention_case(
    batch: int = 8,
    context_len: int = 1024,
    num_heads: int = 32,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    block_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> OpCase:
    """Paged decode vs SDPA on the same KV gathered contiguous (gather not timed)."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = math.ceil(context_len / block_size)
    spec = KVCacheSpec(batch * blocks_per_seq, 1, num_kv_heads, head_dim, block_size, dtype)
    pool = allocate_kv_pool(spec)
    pool.copy_(_rand(spec.shape, dtype, gen))
    kv_cache = layer_view(pool, 0)  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
    # Shuffled block ids: a real pool after some churn is not in order.
    perm = torch.randperm(spec.num_blocks, generator=gen).to(torch.int32)
    block_table = perm.view(batch, blocks_per_seq)  # [batch, blocks_per_seq]
    seq_lens = torch.full((batch,), context_len, dtype=torch.int32)
    query = _rand((batch, num_heads, head_dim), dtype, gen)  # [batch, num_heads, head_dim]
    out = torch.empty_like(query)

    def gathered(kv: int) -> torch.Tensor:  # [batch, num_kv_heads, context_len, head_dim]
        x = kv_cache[block_table.long(), kv]  # [batch, blocks, kv_heads, block_size, dim]
        x = x.permute(0, 2, 1, 3, 4).reshape(batch, num_kv_heads, -1, head_dim)
        return x[:, :, :context_len].contiguous()

    key, value = gathered(0), gathered(1)
    q4 = query.unsqueeze(2)  # [batch, num_heads, 1, head_dim]

    def ours() -> torch.Tensor:
        return ops.decode_attention(
            query, kv_cache, block_table, seq_lens, max_seq_len=context_len, out=out
        )

    def baseline() -> torch.Tensor:
        return F.scaled_dot_product_attention(q4, key, value, enable_gqa=True)

    def check() -> float:
        ref = F.scaled_dot_product_attention(
            q4.float(), key.float(), value.float(), enable_gqa=True
        ).squeeze(2)
        return rel_error(ours(), ref)

    kv_bytes = 2 * batch * context_len * num_kv_heads * head_dim * query.element_size()
    return OpCase(
        op="decode_attention",
        params=dict(
            batch=batch,
            ctx=context_len,
            heads=f"{num_heads}/{num_kv_heads}",
            head_dim=head_dim,
            block=block_size,
            dtype=_dtype_name(dtype),
        ),
        ours=ours,
        baseline=baseline,
        baseline_name="torch SDPA on gathered KV",
        check=check,
        tolerance=_tolerance(dtype),
        bytes_moved=kv_bytes + 2 * query.numel() * query.element_size(),
        flops=4 * batch * num_heads * context_len * head_dim,
        memory_bound=True,
    )


def prefill_attention_case(
    seq_len: int = 1024,
    num_seqs: int = 1,
    num_heads: int = 32,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> OpCase:
    """Causal varlen prefill vs SDPA(is_causal=True) on the same sequences."""
    gen = torch.Generator().manual_seed(seed)
    num_tokens = seq_len * num_seqs
    query = _rand((num_tokens, num_heads, head_dim), dtype, gen)
    key = _rand((num_tokens, num_kv_heads, head_dim), dtype, gen)
    value = _rand((num_tokens, num_kv_heads, head_dim), dtype, gen)
    cu_seqlens = torch.arange(0, num_tokens + 1, seq_len, dtype=torch.int32)
    out = torch.empty_like(query)

    def batched(x: torch.Tensor) -> torch.Tensor:  # [num_seqs, heads, seq_len, head_dim]
        return x.view(num_seqs, seq_len, x.shape[1], head_dim).transpose(1, 2)

    q4, k4, v4 = batched(query), batched(key), batched(value)

    def ours() -> torch.Tensor:
        return ops.prefill_attention(query, key, value, cu_seqlens, max_seqlen=seq_len, out=out)

    def baseline() -> torch.Tensor:
        return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=True)

    def check() -> float:
        ref = F.scaled_dot_product_attention(
            q4.float(), k4.float(), v4.float(), is_causal=True, enable_gqa=True
        )
        ref = ref.transpose(1, 2).reshape(num_tokens, num_heads, head_dim)
        return rel_error(ours(), ref)

    # Causal: half of the QK^T and PV products.
    flops = 2 * num_seqs * num_heads * seq_len * seq_len * head_dim
    return OpCase(
        op="prefill_attention",
        params=dict(
            seqs=num_seqs,
            seq_len=seq_len,
            heads=f"{num_heads}/{num_kv_heads}",
            head_dim=head_dim,
            dtype=_dtype_name(dtype),
        ),
        ours=ours,
        baseline=baseline,
        baseline_name="torch SDPA causal",
        check=check,
        tolerance=_tolerance(dtype),
        flops=flops,
    )


def write_kv_case(
    num_tokens: int = 4096,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    block_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> OpCase:
    """Scatter by slot_mapping vs torch advanced-index assignment into the same pool."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = math.ceil(num_tokens / block_size) * 2
    spec = KVCacheSpec(num_blocks, 1, num_kv_heads, head_dim, block_size, dtype)
    kv_cache = layer_view(allocate_kv_pool(spec), 0)
    key = _rand((num_tokens, num_kv_heads, head_dim), dtype, gen)
    value = _rand((num_tokens, num_kv_heads, head_dim), dtype, gen)
    slot_mapping = torch.randperm(spec.num_slots, generator=gen)[:num_tokens]  # int64
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size

    def ours() -> None:
        ops.write_kv(key, value, kv_cache, slot_mapping)

    def baseline() -> None:
        kv_cache[blocks, 0, :, offsets] = key
        kv_cache[blocks, 1, :, offsets] = value

    def check() -> float:
        kv_cache.normal_(generator=gen)
        ours()
        got = torch.stack([kv_cache[blocks, 0, :, offsets], kv_cache[blocks, 1, :, offsets]])
        return rel_error(got, torch.stack([key, value]))

    nbytes = 2 * 2 * key.numel() * key.element_size()  # K and V, read + write
    return OpCase(
        op="write_kv",
        params=dict(
            tokens=num_tokens,
            kv_heads=num_kv_heads,
            head_dim=head_dim,
            block=block_size,
            dtype=_dtype_name(dtype),
        ),
        ours=ours,
        baseline=baseline,
        baseline_name="torch index assignment",
        check=check,
        tolerance=0.0,
        bytes_moved=nbytes,
    )


def copy_blocks_case(num_pairs: int = 64, block_bytes: int = 1 << 20, seed: int = 0) -> OpCase:
    """Copy of scattered block pairs between two pools vs one plain copy of the same bytes."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 2 * num_pairs
    numel = block_bytes // 2
    src = _rand((num_blocks, numel), torch.bfloat16, gen)  # [num_blocks, block elements]
    dst = torch.zeros_like(src)
    src_ids = torch.randperm(num_blocks, generator=gen)[:num_pairs]
    dst_ids = torch.randperm(num_blocks, generator=gen)[:num_pairs]
    block_mapping = torch.stack([src_ids, dst_ids], dim=1)  # [num_pairs, 2] int64
    plain_src = src[:num_pairs].clone()
    plain_dst = torch.empty_like(plain_src)

    def ours() -> None:
        ops.copy_blocks(src, dst, block_mapping)

    def baseline() -> None:
        plain_dst.copy_(plain_src)

    def check() -> float:
        dst.zero_()
        ours()
        exact = torch.equal(dst[dst_ids], src[src_ids])
        return 0.0 if exact else float("inf")

    return OpCase(
        op="copy_blocks",
        params=dict(pairs=num_pairs, block_KiB=block_bytes // 1024),
        ours=ours,
        baseline=baseline,
        baseline_name="plain copy of the same bytes",
        check=check,
        tolerance=0.0,
        bytes_moved=2 * num_pairs * block_bytes,
    )


def default_cpu_cases(quick: bool = False) -> list[OpCase]:
    """The suite `make run` prints: shapes sized for a 2-core CPU."""
    ctx = 512 if quick else 2048
    cases = [
        decode_attention_case(batch=8, context_len=ctx, dtype=torch.float32),
        decode_attention_case(batch=8, context_len=ctx, dtype=torch.bfloat16),
        prefill_attention_case(seq_len=ctx // 2, dtype=torch.float32),
        prefill_attention_case(seq_len=ctx // 2, dtype=torch.bfloat16),
        write_kv_case(num_tokens=4096, dtype=torch.bfloat16),
        copy_blocks_case(num_pairs=64, block_bytes=1 << 20),
    ]
    return cases
