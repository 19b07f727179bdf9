"""KV transfer benchmark (CPU, shm backend): a decode process pulls a request's blocks from a
prefill process's shared pool, against a plain in-process copy of the same bytes.

Run: ``python -m distserve_rt.benchmarks.transfer_suite --json bench/results/transfer_cpu.json``

Targets (issue 5): the pull reaches >= 90% of the plain copy's bandwidth (the faster of
libc memcpy and torch ``copy_`` of the same bytes, contiguous, in one process); the fixed
cost of one request is <= 50 us (1-block submit -> SUCCESS seen by `wait`).
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from distserve_rt import _native
from distserve_rt.benchmarks.environment import save_result
from distserve_rt.benchmarks.timing import Timing, time_call
from distserve_rt.core.kv_cache import KVCacheSpec
from distserve_rt.transfer import PoolDescriptor, TransferStatus, create_transport


@dataclass(frozen=True)
class TransferCase:
    label: str
    spec: KVCacheSpec
    """The producer's pool (the pulled blocks are scattered over it)."""
    num_pull_blocks: int


CASES = [
    # llama-tiny (4 layers, 2 KV heads, head_dim 64), bf16: 32 KiB blocks.
    TransferCase(
        "llama-tiny, 128 blocks",
        KVCacheSpec(256, 4, 2, 64, block_size=16, dtype=torch.bfloat16),
        128,
    ),
    # OPT-13B (40 layers, 40 heads, head_dim 128), fp16: 12.5 MiB blocks; 32 of them
    # (400 MiB) keep the shared 2-core machine's memory use modest.
    TransferCase(
        "opt-13b, 32 blocks",
        KVCacheSpec(48, 40, 40, 128, block_size=16, dtype=torch.float16),
        32,
    ),
]


def _producer(conn, specs: list[KVCacheSpec]) -> None:
    """Prefill side: allocates the shared pools, sends descriptors, waits to be told to go."""
    with create_transport("shm") as transport:
        descriptors = []
        for spec in specs:
            pool = transport.allocate_pool(spec)
            pool.view(torch.uint8).random_()
            descriptors.append(transport.register_pool(pool).to_bytes())
        conn.send(descriptors)
        conn.recv()


def _time_pull(transport, peer, dst, src_ids, dst_ids) -> Timing:
    def pull() -> None:
        handle = transport.submit(peer, dst, src_ids, dst_ids)
        if handle.wait(60.0) != TransferStatus.SUCCESS:
            raise RuntimeError(f"transfer did not succeed: {handle.error}")

    return time_call(pull, min_time_s=0.5, min_runs=5)


def _time_plain_copy(num_bytes: int, threads: int) -> tuple[Timing, Timing]:
    """(libc memcpy, torch copy_ on `threads` threads) of `num_bytes` contiguous bytes: the
    baseline is the faster (glibc's memcpy streams large copies with non-temporal stores;
    torch's copy_ splits over threads)."""
    src = torch.empty(num_bytes, dtype=torch.uint8).random_()
    dst = torch.zeros(num_bytes, dtype=torch.uint8)
    memcpy = ctypes.CDLL(None).memcpy
    memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    libc = time_call(lambda: memcpy(dst.data_ptr(), src.data_ptr(), num_bytes), min_time_s=0.5)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return libc, time_call(lambda: dst.copy_(src), min_time_s=0.5, min_runs=5)
    finally:
        torch.set_num_threads(before)


def bandwidth_rows(peers, threads_list: list[int]) -> list[dict[str, object]]:
    rows = []
    rng = np.random.default_rng(0)
    for threads in threads_list:
        with create_transport("shm", num_copy_threads=threads) as transport:
            for case, desc in zip(CASES, peers, strict=True):
                peer = transport.open_peer(desc)
                src_ids = rng.choice(case.spec.num_blocks, case.num_pull_blocks, replace=False)
                dst = torch.zeros(
                    (case.num_pull_blocks, *case.spec.shape[1:]), dtype=desc.torch_dtype
                )
                dst_ids = rng.permutation(case.num_pull_blocks)
                num_bytes = case.num_pull_blocks * case.spec.block_bytes
                pull = _time_pull(transport, peer, dst, src_ids, dst_ids)
                libc, torch_copy = _time_plain_copy(num_bytes, threads)
                plain = min(libc, torch_copy, key=lambda t: t.median_s)
                rows.append({
                    "case": case.label,
                    "threads": threads,
                    "bytes": num_bytes,
                    "block_bytes": case.spec.block_bytes,
                    "pull_median_ms": pull.median_s * 1e3,
                    "pull_gbps": num_bytes / pull.median_s / 1e9,
                    "plain_copy_median_ms": plain.median_s * 1e3,
                    "plain_copy_gbps": num_bytes / plain.median_s / 1e9,
                    "libc_memcpy_gbps": num_bytes / libc.median_s / 1e9,
                    "torch_copy_gbps": num_bytes / torch_copy.median_s / 1e9,
                    "ratio_vs_plain_copy": plain.median_s / pull.median_s,
                })  # fmt: skip
                del dst
    return rows


def latency_row(desc: PoolDescriptor, num_runs: int) -> dict[str, object]:
    """Fixed cost per request: 1-block pulls, submit -> SUCCESS seen by `wait`."""
    with create_transport("shm") as transport:
        peer = transport.open_peer(desc)
        dst = torch.zeros((1, *_block_shape(desc)), dtype=desc.torch_dtype)
        wall, engine = [], []
        for i in range(num_runs + 10):
            t0 = time.perf_counter()
            handle = transport.submit(peer, dst, [i % desc.num_blocks], [0])
            status = handle.wait(10.0)
            elapsed = time.perf_counter() - t0
            if status != TransferStatus.SUCCESS:
                raise RuntimeError(f"transfer did not succeed: {handle.error}")
            if i >= 10:  # warm-up
                wall.append(elapsed)
                engine.append(handle.seconds)
    wall.sort()
    return {
        "block_bytes": desc.num_layers * 2 * desc.num_kv_heads * desc.head_bytes,
        "num_runs": num_runs,
        "submit_to_success_median_us": statistics.median(wall) * 1e6,
        "submit_to_success_p99_us": wall[int(0.99 * (len(wall) - 1))] * 1e6,
        "engine_seconds_median_us": statistics.median(engine) * 1e6,
    }


def _block_shape(desc: PoolDescriptor) -> tuple[int, ...]:
    return (desc.num_layers, 2, desc.num_kv_heads, desc.block_size, desc.head_dim)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="save the results here (with provenance)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="copy-worker OpenMP thread counts to measure")  # fmt: skip
    parser.add_argument("--latency-runs", type=int, default=500)
    args = parser.parse_args(argv)
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    producer = ctx.Process(target=_producer, args=(child_conn, [c.spec for c in CASES]))
    producer.start()
    try:
        peers = [PoolDescriptor.from_bytes(d) for d in conn.recv()]
        rows = bandwidth_rows(peers, args.threads)
        latency = latency_row(peers[0], args.latency_runs)
    finally:
        conn.send("done")
        producer.join(60)
    for row in rows:
        print(
            f"{row['case']:<24} threads {row['threads']}: pull {row['pull_gbps']:6.2f} GB/s, "
            f"plain copy {row['plain_copy_gbps']:6.2f} GB/s, ratio {row['ratio_vs_plain_copy']:.2f}"
        )
    print(
        f"1-block ({latency['block_bytes']} B) submit -> SUCCESS: median "
        f"{latency['submit_to_success_median_us']:.1f} us, p99 "
        f"{latency['submit_to_success_p99_us']:.1f} us"
    )
    if args.json:
        payload = {"bandwidth": rows, "latency": latency, "cases": [
            {"label": c.label, "spec": {k: str(v) for k, v in asdict(c.spec).items()},
             "num_pull_blocks": c.num_pull_blocks} for c in CASES
        ], "native_threads": _native.get_num_threads()}  # fmt: skip
        print(f"saved {save_result(args.json, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
