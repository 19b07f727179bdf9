"""Benchmark cases of the CUDA kernels: our kernel(s) and torch baselines on the same data.

Our kernels are called through the raw ABI of `distserve_rt._cuda` (pointers, strides and
the current stream), so the numbers measure the kernels, not the Python wrappers. Each case
checks every variant against an fp32 reference before anything is timed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from gpu_timing import rel_error
from torch.nn.attention import SDPBackend, sdpa_kernel

from distserve_rt import _native

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


@dataclass
class GpuCase:
    op: str
    params: dict[str, object]
    ours: dict[str, Callable[[], object]]
    baselines: dict[str, Callable[[], object]]
    check: Callable[[], dict[str, float]]
    """Relative error of each variant of `ours` against the fp32 reference."""
    tolerance: float
    flops: int = 0
    bytes_moved: int = 0
    graph: bool = False
    extra: dict[str, object] = field(default_factory=dict)


def decode_case(
    batch, ctx, num_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16
) -> GpuCase:
    """Paged decode vs SDPA on the same K/V gathered contiguous (gather not timed)."""
    mod = _native.cuda_module()
    blocks_per_seq = math.ceil(ctx / block_size)
    num_blocks = batch * blocks_per_seq
    kv_cache = torch.randn(num_blocks, 2, num_kv_heads, block_size, head_dim, device="cuda")
    kv_cache = kv_cache.to(dtype)  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
    block_table = torch.randperm(num_blocks, device="cuda").view(batch, -1).to(torch.int32)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    query = torch.randn(batch, num_heads, head_dim, device="cuda").to(dtype)
    out = torch.empty_like(query)
    ws_bytes = mod.decode_attention_workspace_bytes(
        batch=batch, num_heads=num_heads, head_dim=head_dim, max_seq_len=ctx, stream=0
    )
    workspace = torch.empty(max(ws_bytes, 16), dtype=torch.uint8, device="cuda")
    scale = head_dim**-0.5

    def ours():
        mod.decode_attention(
            query=query.data_ptr(), out=out.data_ptr(), kv_cache=kv_cache.data_ptr(),
            block_table=block_table.data_ptr(), seq_lens=seq_lens.data_ptr(),
            workspace=workspace.data_ptr(), workspace_bytes=ws_bytes, batch=batch,
            max_seq_len=ctx, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            query_stride=query.stride(0), out_stride=out.stride(0), softmax_scale=scale,
            num_blocks=num_blocks, block_size=block_size, kv_block_stride=kv_cache.stride(0),
            max_blocks_per_seq=blocks_per_seq, dtype=DTYPE_CODES[dtype], stream=_stream(),
        )  # fmt: skip

    def gathered(kind: int) -> torch.Tensor:  # [batch, num_kv_heads, ctx, head_dim]
        x = kv_cache[block_table.long(), kind]  # [batch, blocks, kv_heads, block_size, dim]
        x = x.permute(0, 2, 1, 3, 4).reshape(batch, num_kv_heads, -1, head_dim)
        return x[:, :, :ctx].contiguous()

    key, value = gathered(0), gathered(1)
    q4 = query.unsqueeze(2)  # [batch, num_heads, 1, head_dim]

    def check() -> dict[str, float]:
        out.fill_(float("nan"))
        ours()
        ref = F.scaled_dot_product_attention(
            q4.float(), key.float(), value.float(), enable_gqa=True
        ).squeeze(2)
        return {"kernel": rel_error(out, ref)}

    kv_bytes = 2 * batch * ctx * num_kv_heads * head_dim * query.element_size()
    return GpuCase(
        op="decode_attention",
        params=dict(
            batch=batch,
            ctx=ctx,
            heads=f"{num_heads}/{num_kv_heads}",
            head_dim=head_dim,
            block=block_size,
            dtype=str(dtype)[6:],
        ),
        ours={"kernel": ours},
        baselines={
            "sdpa_contiguous": lambda: F.scaled_dot_product_attention(
                q4, key, value, enable_gqa=True
            )
        },
        check=check,
        tolerance=1e-2 if dtype != torch.float32 else 1e-4,
        flops=4 * batch * num_heads * ctx * head_dim,
        bytes_moved=kv_bytes + 2 * query.numel() * query.element_size(),
        extra=dict(workspace_bytes=ws_bytes),
    )


class _FusedWrite:
    """The engine's prefill: a pool and a slot mapping (whole blocks in shuffled order), so the
    kernel also writes the new tokens' K/V (the fused write_kv)."""

    def __init__(self, key, value, block_size=16):
        num_tokens, num_kv_heads, head_dim = key.shape
        num_blocks = 2 * math.ceil(num_tokens / block_size)
        self.block_size = block_size
        # [num_blocks, 2, num_kv_heads, block_size, head_dim]
        self.kv_cache = key.new_zeros(num_blocks, 2, num_kv_heads, block_size, head_dim)
        blocks = torch.randperm(num_blocks, device=key.device)[: math.ceil(num_tokens / block_size)]
        offsets = torch.arange(block_size, device=key.device)
        self.slots = (blocks[:, None] * block_size + offsets).flatten()[:num_tokens]
        self.key, self.value = key, value

    def args(self) -> dict[str, int]:
        return dict(
            kv_cache=self.kv_cache.data_ptr(), slot_mapping=self.slots.data_ptr(),
            num_blocks=self.kv_cache.shape[0], block_size=self.block_size,
            kv_block_stride=self.kv_cache.stride(0),
        )  # fmt: skip

    def written_correctly(self) -> bool:
        blocks, offsets = self.slots // self.block_size, self.slots % self.block_size
        written = self.kv_cache[blocks, :, :, offsets]  # [num_tokens, 2, num_kv_heads, dim]
        return torch.equal(written, torch.stack([self.key, self.value], dim=1))


def prefill_case(
    seq_len,
    num_seqs,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    dtype=torch.bfloat16,
    slot_mapping=False,
) -> GpuCase:
    """Causal varlen prefill vs SDPA (default and cuDNN backends) on [batch, heads, seq, dim]
    copies of the same data (layout change not timed). slot_mapping: the engine's call, which
    also writes the new K/V into a pool (checked bit for bit)."""
    mod = _native.cuda_module()
    num_tokens = seq_len * num_seqs
    group = num_heads // num_kv_heads
    query = torch.randn(num_tokens, num_heads, head_dim, device="cuda").to(dtype)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, device="cuda").to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, device="cuda").to(dtype)
    out = torch.empty_like(query)
    cu_seqlens = (torch.arange(num_seqs + 1, device="cuda") * seq_len).to(torch.int32)
    scale = head_dim**-0.5
    fused = _FusedWrite(key, value) if slot_mapping else None
    paged = fused.args() if fused else dict(
        kv_cache=0, slot_mapping=0, num_blocks=0, block_size=16, kv_block_stride=0
    )  # fmt: skip

    def ours():
        mod.prefill_attention(
            query=query.data_ptr(), key=key.data_ptr(), value=value.data_ptr(),
            out=out.data_ptr(), cu_seqlens=cu_seqlens.data_ptr(), batch=num_seqs,
            num_tokens=num_tokens, max_seqlen_q=seq_len, num_heads=num_heads,
            num_kv_heads=num_kv_heads, head_dim=head_dim, query_token_stride=query.stride(0),
            key_token_stride=key.stride(0), value_token_stride=value.stride(0),
            out_token_stride=out.stride(0), softmax_scale=scale, block_table=0,
            prefix_lens=0, max_blocks_per_seq=0, dtype=DTYPE_CODES[dtype], stream=_stream(),
            **paged,
        )  # fmt: skip

    def bhsd(x: torch.Tensor) -> torch.Tensor:  # [tokens, heads, dim] -> [seqs, heads, S, dim]
        return x.view(num_seqs, seq_len, x.shape[1], head_dim).transpose(1, 2).contiguous()

    q4, k4, v4 = bhsd(query), bhsd(key), bhsd(value)
    k4x, v4x = k4.repeat_interleave(group, dim=1), v4.repeat_interleave(group, dim=1)

    def sdpa(k, v, backend=None, gqa=False):
        def run():
            if backend is None:
                return F.scaled_dot_product_attention(q4, k, v, is_causal=True, enable_gqa=gqa)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q4, k, v, is_causal=True, enable_gqa=gqa)

        return run

    def check() -> dict[str, float]:
        out.fill_(float("nan"))
        if fused:
            fused.kv_cache.fill_(float("nan"))
        ours()
        ref = F.scaled_dot_product_attention(q4.float(), k4x.float(), v4x.float(), is_causal=True)
        ref = ref.transpose(1, 2).reshape(num_tokens, num_heads, head_dim)
        if fused and not fused.written_correctly():
            return {"kernel": math.inf}  # reported WRONG, not timed
        return {"kernel": rel_error(out, ref)}

    return GpuCase(
        op="prefill_attention",
        params=dict(
            seq=seq_len,
            seqs=num_seqs,
            heads=f"{num_heads}/{num_kv_heads}",
            head_dim=head_dim,
            dtype=str(dtype)[6:],
            slot_mapping=slot_mapping,
        ),
        ours={"kernel": ours},
        baselines={
            "sdpa_default_gqa": sdpa(k4, v4, gqa=True),
            "sdpa_default_mha": sdpa(k4x, v4x),
            "sdpa_cudnn_mha": sdpa(k4x, v4x, SDPBackend.CUDNN_ATTENTION),
        },
        check=check,
        tolerance=1e-2 if dtype != torch.float32 else 1e-4,
        flops=num_seqs * 2 * seq_len * (seq_len + 1) * head_dim * num_heads,
    )


def write_kv_case(
    num_tokens=16384, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16
) -> GpuCase:
    """Scatter of new tokens' K/V into shuffled slots vs torch advanced-index assignment."""
    mod = _native.cuda_module()
    num_blocks = 2 * math.ceil(num_tokens / block_size)
    kv_cache = torch.zeros(
        num_blocks, 2, num_kv_heads, block_size, head_dim, dtype=dtype, device="cuda"
    )
    key = torch.randn(num_tokens, num_kv_heads, head_dim, device="cuda").to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, device="cuda").to(dtype)
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:num_tokens]
    blocks, offsets = slots // block_size, slots % block_size

    def ours():
        mod.write_kv(
            key=key.data_ptr(), value=value.data_ptr(), kv_cache=kv_cache.data_ptr(),
            slot_mapping=slots.data_ptr(), num_tokens=num_tokens, num_kv_heads=num_kv_heads,
            head_dim=head_dim, key_token_stride=key.stride(0),
            value_token_stride=value.stride(0), num_blocks=num_blocks, block_size=block_size,
            kv_block_stride=kv_cache.stride(0), dtype=DTYPE_CODES[dtype], stream=_stream(),
        )  # fmt: skip

    def baseline():
        kv_cache[blocks, 0, :, offsets] = key
        kv_cache[blocks, 1, :, offsets] = value

    def check() -> dict[str, float]:
        kv_cache.fill_(float("nan"))
        ours()
        written = torch.stack([kv_cache[blocks, 0, :, offsets], kv_cache[blocks, 1, :, offsets]])
        return {"kernel": rel_error(written, torch.stack([key, value]))}

    return GpuCase(
        op="write_kv",
        params=dict(
            tokens=num_tokens,
            kv_heads=num_kv_heads,
            head_dim=head_dim,
            block=block_size,
            dtype=str(dtype)[6:],
        ),
        ours={"kernel": ours},
        baselines={"torch_index_put": baseline},
        check=check,
        tolerance=0.0,
        bytes_moved=4 * key.numel() * key.element_size(),
        graph=True,
    )


def copy_blocks_case(num_pairs=256, block_bytes=2 << 20) -> GpuCase:
    """Block copies between two pools (the KV transfer primitive): our kernel and
    cudaMemcpyBatchAsync vs one contiguous copy of the same bytes."""
    mod = _native.cuda_module()
    numel = block_bytes // 2
    src = torch.randn(2 * num_pairs, numel, device="cuda").to(torch.bfloat16)
    dst = torch.zeros(2 * num_pairs, numel, device="cuda", dtype=torch.bfloat16)
    src_ids = torch.randperm(2 * num_pairs)[:num_pairs]
    dst_ids = torch.randperm(2 * num_pairs)[:num_pairs]
    mapping_cpu = torch.stack([src_ids, dst_ids], dim=1).contiguous().pin_memory()
    mapping = mapping_cpu.cuda()  # [num_pairs, 2]
    flat_src = src[:num_pairs].view(-1)
    flat_dst = dst[num_pairs:].view(-1)
    args = lambda m: dict(
        src=src.data_ptr(),
        dst=dst.data_ptr(),
        block_mapping=m.data_ptr(),
        num_pairs=num_pairs,
        src_num_blocks=2 * num_pairs,
        dst_num_blocks=2 * num_pairs,
        src_block_stride_bytes=block_bytes,
        dst_block_stride_bytes=block_bytes,
        block_bytes=block_bytes,
    )

    variants = {
        "kernel": lambda: mod.copy_blocks(**args(mapping), stream=_stream()),
        "memcpy_batch": lambda: mod.copy_blocks_memcpy_batch(**args(mapping_cpu), stream=_stream()),
    }

    def check() -> dict[str, float]:
        errors = {}
        for name, run in variants.items():
            dst.fill_(float("nan"))
            run()
            errors[name] = rel_error(dst[dst_ids.cuda()], src[src_ids.cuda()])
        return errors

    return GpuCase(
        op="copy_blocks",
        params=dict(pairs=num_pairs, block_kib=block_bytes >> 10),
        ours=variants,
        baselines={"contiguous_memcpy": lambda: flat_dst.copy_(flat_src)},
        check=check,
        tolerance=0.0,
        bytes_moved=2 * num_pairs * block_bytes,
    )
