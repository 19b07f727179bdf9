"""Each CUDA kernel once, on small random inputs, checked against its plain-torch reference.

bench/gpu/first_run.sh runs this under compute-sanitizer (racecheck, memcheck, synccheck),
which slows kernels 10-100x: every shape is the smallest that still takes the kernel's
path. Calls (name: path taken):
  prefill_bf16_d128, prefill_fp16_d64: tensor-core prefill (mma.sync, ldmatrix, cp.async),
      GQA group 4, two sequences of uneven length (ragged last tiles);
  prefill_paged_bf16: the same after a paged prefix, writing the new K/V (fused write_kv);
  prefill_fp32: the SIMT prefill;
  decode_bf16, decode_fp32: decode without splits; decode_split_bf16: a 1100-token context
      (> 512 tokens: split + merge kernels);
  write_kv, copy_blocks, copy_blocks_memcpy_batch;
  transfer_pull: the block-slice transfer kernel (a cuda_ipc pull of two heads of three
      blocks from a second process; on CPU, the shm transport).
Outputs are poisoned (NaN) before each call and inputs are random, never zeros.

Usage: python bench/gpu/every_op.py [--device cuda|cpu] [--only NAME ...]
--device cpu runs the same calls through the CPU module: first_run.sh's dry run checks the
script that way on a machine without a GPU. Exit status 1 names each op that failed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # distserve_rt, tests

import torch  # noqa: E402

from distserve_rt.core.kv_cache import KVCacheSpec  # noqa: E402
from distserve_rt.ops import copy_blocks, decode_attention, prefill_attention, write_kv  # noqa: E402
from distserve_rt.ops.cache import reference_write_kv  # noqa: E402
from distserve_rt.ops.decode_attention import reference_decode_attention  # noqa: E402
from distserve_rt.ops.prefill_attention import reference_prefill_attention  # noqa: E402

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}
NUM_KV_HEADS, GROUP = 2, 4


def randn(*shape: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype)


def paged_cache(lens: list[int], head_dim: int, dtype, gen, block_size: int = 16):
    """kv_cache [num_blocks, 2, num_kv_heads, block_size, head_dim] with shuffled block ids,
    block_table [batch, max_blocks] (-1 beyond each sequence), one spare block."""
    blocks = [math.ceil(n / block_size) for n in lens]
    num_blocks = sum(blocks) + 1
    kv_cache = randn(num_blocks, 2, NUM_KV_HEADS, block_size, head_dim, dtype=dtype, gen=gen)
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    table = torch.full((len(lens), max(blocks)), -1, dtype=torch.int32)
    for i, n in enumerate(blocks):
        table[i, :n] = torch.tensor(ids[:n], dtype=torch.int32)
        ids = ids[n:]
    return kv_cache, table


# Inputs are built and references computed on the CPU, so that under compute-sanitizer the
# GPU runs little besides the kernel under test (each launch there is instrumented).
def on(device: str, tensors: dict) -> dict:
    return {
        name: t.to(device, copy=True) if isinstance(t, torch.Tensor) else t
        for name, t in tensors.items()
    }


def prefill(dtype, head_dim: int, prefix_lens: list[int] | None = None):
    def run(device: str, gen: torch.Generator) -> float:
        seq_lens = [37, 90]  # neither a multiple of the 64-row tile
        num_tokens = sum(seq_lens)
        args = dict(
            query=randn(num_tokens, NUM_KV_HEADS * GROUP, head_dim, dtype=dtype, gen=gen),
            key=randn(num_tokens, NUM_KV_HEADS, head_dim, dtype=dtype, gen=gen),
            value=randn(num_tokens, NUM_KV_HEADS, head_dim, dtype=dtype, gen=gen),
            cu_seqlens=torch.tensor([0, seq_lens[0], num_tokens], dtype=torch.int32),
        )
        if prefix_lens is not None:
            total = [p + n for p, n in zip(prefix_lens, seq_lens, strict=True)]
            kv_cache, table = paged_cache(total, head_dim, dtype, gen)
            block_size = kv_cache.shape[3]
            slots = [int(table[i, pos // block_size]) * block_size + pos % block_size
                     for i, (p, n) in enumerate(zip(prefix_lens, seq_lens, strict=True))
                     for pos in range(p, p + n)]  # fmt: skip
            args.update(
                kv_cache=kv_cache,
                block_table=table,
                prefix_lens=torch.tensor(prefix_lens, dtype=torch.int32),
                slot_mapping=torch.tensor(slots, dtype=torch.int64),
            )
        ours = on(device, args)  # copies: the reference writes into its own kv_cache
        out = torch.full_like(ours["query"], math.nan)
        prefill_attention(**ours, max_seqlen=max(seq_lens), out=out)
        error = rel_error(out, reference_prefill_attention(**args))
        if prefix_lens is not None:
            error = max(error, bit_error(ours["kv_cache"], args["kv_cache"]))
        return error

    return run


def decode(dtype, seq_lens: list[int], head_dim: int = 128):
    def run(device: str, gen: torch.Generator) -> float:
        kv_cache, table = paged_cache(seq_lens, head_dim, dtype, gen)
        args = dict(
            query=randn(len(seq_lens), NUM_KV_HEADS * GROUP, head_dim, dtype=dtype, gen=gen),
            kv_cache=kv_cache,
            block_table=table,
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        )
        ours = on(device, args)
        out = torch.full_like(ours["query"], math.nan)
        decode_attention(**ours, max_seq_len=max(seq_lens), out=out)
        return rel_error(out, reference_decode_attention(**args))

    return run


def run_write_kv(device: str, gen: torch.Generator) -> float:
    dtype, head_dim = torch.bfloat16, 128
    expected = torch.full((6, 2, NUM_KV_HEADS, 16, head_dim), math.nan, dtype=dtype)
    key = randn(40, NUM_KV_HEADS, head_dim, dtype=dtype, gen=gen)
    value = randn(40, NUM_KV_HEADS, head_dim, dtype=dtype, gen=gen)
    slots = torch.randperm(6 * 16, generator=gen)[:40]
    slots[[3, 17]] = -1  # padding tokens: skipped
    kv_cache = expected.to(device, copy=True)
    write_kv(key.to(device), value.to(device), kv_cache, slots.to(device))
    reference_write_kv(key, value, expected, slots)
    return bit_error(kv_cache, expected)


def run_copy_blocks(on_host: bool):
    def run(device: str, gen: torch.Generator) -> float:
        src = randn(8, 4, 2, NUM_KV_HEADS, 16, 64, dtype=torch.float16, gen=gen)
        expected = torch.full_like(src, math.nan)
        pairs = [[5, 0], [1, 7], [6, 3]]
        dst = expected.to(device, copy=True)
        # Host ids take cudaMemcpyBatchAsync's path on CUDA, device ids the kernel's.
        mapping = pairs if on_host else torch.tensor(pairs, dtype=torch.int64, device=device)
        copy_blocks(src.to(device), dst, mapping)
        for s, d in pairs:
            expected[d] = src[s]
        return bit_error(dst, expected)

    return run


def run_transfer_pull(device: str, gen: torch.Generator) -> float:
    # The producer is a real second process, as in production (and in tests/transfer).
    from distserve_rt.transfer import KVSlice, PoolDescriptor, TransferStatus, create_transport
    from tests.transfer.peer_process import PeerProcess, random_pool

    name = "cuda_ipc" if device == "cuda" else "shm"
    spec = KVCacheSpec(num_blocks=6, num_layers=2, num_kv_heads=4, head_dim=64, block_size=16,
                       dtype=torch.bfloat16)  # fmt: skip
    peer = PeerProcess(name)
    try:
        desc = PoolDescriptor.from_bytes(peer.alloc(spec, 7))
        kwargs = {"device": "cuda"} if device == "cuda" else {}
        with create_transport(name, **kwargs) as transport:
            dst = torch.full((3, 2, 2, 2, 16, 64), math.nan, dtype=spec.dtype, device=device)
            src_ids = [4, 0, 5]
            handle = transport.submit(transport.open_peer(desc), dst, src_ids, [2, 0, 1],
                                      KVSlice(src_head_start=2, num_heads=2))  # fmt: skip
            if handle.wait(30.0) != TransferStatus.SUCCESS:
                raise RuntimeError(f"the pull ended {handle.status()}: {handle.error}")
            expected = random_pool(spec, 7)[src_ids][:, :, :, 2:4][[1, 2, 0]]
            return bit_error(dst, expected.to(device))
    finally:
        peer.exit()


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max(1, max |e|) in fp32; NaN anywhere gives inf (a poisoned row)."""
    actual, expected = actual.float().cpu(), expected.float().cpu()
    if actual.isnan().any() != expected.isnan().any():
        return math.inf
    diff = (actual - expected).nan_to_num(0.0).abs().max().item() if actual.numel() else 0.0
    return diff / max(1.0, expected.nan_to_num(0.0).abs().max().item() if actual.numel() else 0)


def bit_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """0.0 when bit-identical (NaN poison where nothing was written must stay), else inf."""
    return (
        0.0 if actual.cpu().view(torch.uint8).equal(expected.cpu().view(torch.uint8)) else math.inf
    )


OPS: dict[str, tuple[Callable[[str, torch.Generator], float], float]] = {
    "prefill_bf16_d128": (prefill(torch.bfloat16, 128), TOLERANCE[torch.bfloat16]),
    "prefill_fp16_d64": (prefill(torch.float16, 64), TOLERANCE[torch.float16]),
    "prefill_paged_bf16": (prefill(torch.bfloat16, 128, [21, 0]), TOLERANCE[torch.bfloat16]),
    "prefill_fp32": (prefill(torch.float32, 64), TOLERANCE[torch.float32]),
    "decode_bf16": (decode(torch.bfloat16, [5, 200]), TOLERANCE[torch.bfloat16]),
    "decode_fp32": (decode(torch.float32, [5, 200], head_dim=64), TOLERANCE[torch.float32]),
    "decode_split_bf16": (decode(torch.bfloat16, [1100, 3]), TOLERANCE[torch.bfloat16]),
    "write_kv": (run_write_kv, 0.0),
    "copy_blocks": (run_copy_blocks(on_host=False), 0.0),
    "copy_blocks_memcpy_batch": (run_copy_blocks(on_host=True), 0.0),
    "transfer_pull": (run_transfer_pull, 0.0),
}


def op_names(text: str) -> str:
    if text not in OPS:
        raise argparse.ArgumentTypeError(f"unknown op {text!r}; allowed: {', '.join(OPS)}")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--only", nargs="+", type=op_names, default=list(OPS), metavar="NAME")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("every_op: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    # cudaMemcpyBatchAsync refuses the legacy default stream.
    stream = torch.cuda.Stream() if args.device == "cuda" else None
    failed = []
    for name in args.only:
        fn, tolerance = OPS[name]
        start = time.perf_counter()
        try:
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                error = fn(args.device, torch.Generator().manual_seed(len(name)))
            if args.device == "cuda":
                torch.cuda.synchronize()  # a kernel fault surfaces here, named after its op
            status = "ok" if error <= tolerance else f"WRONG (error {error:.3g} > {tolerance})"
        except Exception as exc:  # report every op: one failure must not hide the rest
            status = f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if status != "ok":
            failed.append(name)
        print(f"{name:26} {status:60} {time.perf_counter() - start:7.2f} s", flush=True)
    print(f"every_op: {len(args.only) - len(failed)}/{len(args.only)} ok on {args.device}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
