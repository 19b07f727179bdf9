"""KV transfer benchmark of the nixl transport (CPU): a decode process pulls a request's
blocks from a prefill process through NIXL READ over UCX, against the shm transport pulling
the same blocks and a plain in-process copy of the same bytes.

Run: ``python -m distserve_rt.benchmarks.transfer_nixl_suite --json
bench/results/transfer_nixl_cpu.json``

Both processes run on one machine, so "cross-node" here is loopback TCP (``UCX_TLS=tcp``:
the path two nodes would use, minus the wire). UCX variants measured: TCP with the 64K
segments the transport sets by default, TCP with UCX's own 8K segments, and UCX's default
transport choice (on one host it picks cma/shared memory, not the network). The nixl pull
time includes the copy out of the staging buffer (`NixlTransport.copy_out_seconds`, also
reported on its own).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

import numpy as np
import torch

from distserve_rt.benchmarks.environment import save_result
from distserve_rt.benchmarks.timing import time_call
from distserve_rt.benchmarks.transfer_suite import TransferCase, _time_plain_copy
from distserve_rt.core.kv_cache import KVCacheSpec
from distserve_rt.transfer import PoolDescriptor, TransferStatus, create_transport

CASES = [
    # llama-tiny (4 layers, 2 KV heads, head_dim 64), bf16: 32 KiB blocks, 4 MiB pulled.
    TransferCase(
        "llama-tiny, 128 blocks",
        KVCacheSpec(256, 4, 2, 64, block_size=16, dtype=torch.bfloat16),
        128,
    ),  # fmt: skip
    # OPT-13B (40 layers, 40 heads, head_dim 128), fp16: 12.5 MiB blocks, 8 pulled (100 MiB;
    # the machine is shared, and TCP at ~1 GB/s makes bigger pulls only slower to time).
    TransferCase(
        "opt-13b, 8 blocks", KVCacheSpec(12, 40, 40, 128, block_size=16, dtype=torch.float16), 8
    ),
]
TCP_64K = {"UCX_TLS": "tcp", "UCX_TCP_TX_SEG_SIZE": "64K"}
VARIANTS = {  # label -> (environment of both processes, NixlTransport kwargs of both)
    "tcp, 64K segments": (TCP_64K, {}),
    "tcp, 8K segments (UCX default)": ({"UCX_TLS": "tcp", "UCX_TCP_TX_SEG_SIZE": "8K"}, {}),
    "tcp, 64K segments, busy progress thread (progress_delay_us=0)": (
        TCP_64K,
        {"progress_delay_us": 0},
    ),
    "UCX default transports (same host: cma/shm)": ({"UCX_TCP_TX_SEG_SIZE": "64K"}, {}),
}
STAGING_BYTES = 128 << 20


def _producer(conn, name: str, specs: list[KVCacheSpec], kwargs: dict) -> None:
    with create_transport(name, **kwargs) as transport:
        descriptors = []
        for spec in specs:
            pool = transport.allocate_pool(spec)
            pool.view(torch.uint8).random_()
            descriptors.append(transport.register_pool(pool).to_bytes())
        conn.send(descriptors)
        conn.recv()


def _start_producer(name: str, env: dict[str, str], kwargs: dict):
    """A prefill process for transport `name`, started with `env` (UCX reads it at start)."""
    saved = {k: os.environ.get(k) for k in ("UCX_TLS", "UCX_TCP_TX_SEG_SIZE")}
    for key in saved:
        os.environ.pop(key, None)
    os.environ.update(env)
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    process = ctx.Process(
        target=_producer, args=(child_conn, name, [c.spec for c in CASES], kwargs)
    )
    process.start()
    return process, conn, [PoolDescriptor.from_bytes(d) for d in conn.recv()]


def _stop_producer(process, conn) -> None:
    conn.send("done")
    process.join(60)


def _pull_once(transport, peer, dst, src_ids, dst_ids) -> None:
    handle = transport.submit(peer, dst, src_ids, dst_ids)
    if handle.wait(120.0) != TransferStatus.SUCCESS:
        raise RuntimeError(f"transfer did not succeed: {handle.error}")


def _measure(name: str, env: dict[str, str], latency_runs: int, **kwargs) -> dict:
    process, conn, descs = _start_producer(name, env, kwargs)
    rows = []
    try:
        staging = {"staging_bytes": STAGING_BYTES} if name == "nixl" else {}
        with create_transport(name, **kwargs, **staging) as transport:
            rng = np.random.default_rng(0)
            for case, desc in zip(CASES, descs, strict=True):
                rows.append(_bandwidth_row(transport, transport.open_peer(desc), case, rng))
            latency = _latency(transport, transport.open_peer(descs[0]), latency_runs)
    finally:
        _stop_producer(process, conn)
    return {"bandwidth": rows, "latency": latency}


def _bandwidth_row(transport, peer, case: TransferCase, rng: np.random.Generator) -> dict:
    src_ids = rng.choice(case.spec.num_blocks, case.num_pull_blocks, replace=False)
    dst_ids = rng.permutation(case.num_pull_blocks)
    dst = torch.zeros((case.num_pull_blocks, *case.spec.shape[1:]), dtype=case.spec.dtype)
    copy_before = getattr(transport, "copy_out_seconds", 0.0)
    timing = time_call(lambda: _pull_once(transport, peer, dst, src_ids, dst_ids),
                       min_time_s=1.0, min_runs=5)  # fmt: skip
    copy_s = getattr(transport, "copy_out_seconds", 0.0) - copy_before
    num_bytes = case.num_pull_blocks * case.spec.block_bytes
    return {
        "case": case.label, "bytes": num_bytes,
        "pull_median_ms": timing.median_s * 1e3,
        "pull_gbps": num_bytes / timing.median_s / 1e9,
        "pull_best_gbps": num_bytes / timing.min_s / 1e9,
        "num_runs": timing.num_runs,
        "staging_copy_ms_per_pull": copy_s / (timing.num_runs + 1) * 1e3,
    }  # fmt: skip


def _latency(transport, peer, num_runs: int) -> dict:
    """Fixed cost per request: 1-block pulls, submit -> SUCCESS seen by `wait`."""
    desc = peer.descriptor
    dst = torch.zeros((1, desc.num_layers, 2, desc.num_kv_heads, desc.block_size, desc.head_dim),
                      dtype=desc.torch_dtype)  # fmt: skip
    samples = []
    for i in range(num_runs + 10):
        t0 = time.perf_counter()
        _pull_once(transport, peer, dst, [i % desc.num_blocks], [0])
        if i >= 10:  # warm-up
            samples.append(time.perf_counter() - t0)
    samples.sort()
    return {
        "block_bytes": desc.num_layers * 2 * desc.num_kv_heads * desc.head_bytes,
        "num_runs": num_runs,
        "submit_to_success_median_us": statistics.median(samples) * 1e6,
        "submit_to_success_p99_us": samples[int(0.99 * (len(samples) - 1))] * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="save the results here (with provenance)")
    parser.add_argument("--latency-runs", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for label, (env, kwargs) in VARIANTS.items():
        results[f"nixl, {label}"] = _measure("nixl", env, args.latency_runs, **kwargs)
    results["shm"] = _measure("shm", {}, args.latency_runs)
    plain = []
    for case in CASES:
        num_bytes = case.num_pull_blocks * case.spec.block_bytes
        libc, torch_copy = _time_plain_copy(num_bytes, 1)
        best = min(libc, torch_copy, key=lambda t: t.median_s)
        plain.append({"case": case.label, "bytes": num_bytes,
                      "plain_copy_gbps": num_bytes / best.median_s / 1e9})  # fmt: skip
    for name, result in results.items():
        for row in result["bandwidth"]:
            print(f"{name:<72} {row['case']:<24} {row['pull_gbps']:7.2f} GB/s "
                  f"(staging copy {row['staging_copy_ms_per_pull']:.2f} ms/pull)")  # fmt: skip
        lat = result["latency"]
        print(f"{name:<72} 1-block fixed cost: median {lat['submit_to_success_median_us']:.0f} us"
              f", p99 {lat['submit_to_success_p99_us']:.0f} us")  # fmt: skip
    for row in plain:
        print(
            f"{'plain copy (one process)':<72} {row['case']:<24} {row['plain_copy_gbps']:7.2f} GB/s"
        )
    if args.json:
        payload = {"transports": results, "plain_copy": plain, "variants": VARIANTS,
                   "load_average": os.getloadavg()}  # fmt: skip
        print(f"saved {save_result(args.json, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
