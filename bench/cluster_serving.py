"""Disaggregated serving on a Ray cluster: prefill and decode on different (fake) nodes, KV
pulled through nixl (UCX over TCP), against both on the same node, KV through shm.

    PYTHONPATH=. .venv/bin/python bench/cluster_serving.py
    PYTHONPATH=. .venv/bin/python bench/cluster_serving.py --num-requests 8 --repeats 1 \\
        --output /tmp/cluster.json

The cluster is the tests' fake 2-node one (tests/cluster/fake_cluster.py: nodes on 127.0.0.2
and 127.0.0.3 of this machine, UCX_TLS=tcp so nixl takes the network path, not cma). Both
layouts run the same requests (dummy:llama-tiny, closed batch: all sent at once), repeats
alternating the layouts so that a change of machine load hits both. Per run: wall time,
mean TTFT / TPOT / KV pull time per request (the controller's latency breakdown), and the
transfer totals (bytes, summed pull seconds). Writes ``bench/results/cluster_serving_cpu.json``
with the environment (date, commit, command, load average) and the load average around
every run (a shared machine's numbers move with it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402

from distserve_rt.benchmarks.environment import environment  # noqa: E402
from distserve_rt.config import DisaggConfig, EngineConfig, PhaseConfig, Placement  # noqa: E402
from distserve_rt.engine.controller import Controller  # noqa: E402
from distserve_rt.sampling_params import SamplingParams  # noqa: E402
from tests.cluster.conftest import HEAD_IP, FakeCluster  # noqa: E402

LAYOUTS = {"same_node": (0, 0), "cross_node": (0, 1)}


def run_layout(address: str, nodes: tuple[int, int], args) -> dict:
    config = EngineConfig(
        model="dummy:llama-tiny", block_size=16, max_model_len=1024,
        kv_cache_memory_bytes=64 << 20, log_stats_interval_s=0,
    )  # fmt: skip
    dc = DisaggConfig(
        launcher="ray", ray_address=address, instance_nodes=nodes, placement_timeout_s=30
    )
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    prompts = [
        [3 + (7 * i + j) % 500 for j in range(args.prompt_len)] for i in range(args.num_requests)
    ]
    load_before = os.getloadavg()[0]
    with Controller(config, Placement.disaggregated(PhaseConfig(), PhaseConfig()), dc) as c:
        transport = c.transport_name
        start = time.monotonic()
        for i, p in enumerate(prompts):
            c.add_request(str(i), p, params)
        outputs = {}
        while c.has_unfinished_requests():
            assert time.monotonic() - start < 300, "not finished after 300 s"
            outputs.update({o.request_id: o for o in c.step(0.01) if o.finished})
        wall = time.monotonic() - start
        totals = c.stats().transfers
    metrics = [o.metrics for o in outputs.values()]
    failed = [o.request_id for o in outputs.values() if o.outputs[0].finish_reason == "error"]
    pulls = [m.breakdown.transfer for m in metrics if m.breakdown and m.breakdown.transfer]
    return {
        "transport": transport,
        "num_failed": len(failed),
        "wall_s": wall,
        "tokens_per_s": args.num_requests * args.output_len / wall,
        "mean_ttft_s": statistics.fmean(m.ttft for m in metrics),
        "mean_tpot_s": statistics.fmean(m.tpot for m in metrics if m.tpot is not None),
        "mean_pull_s": statistics.fmean(pulls) if pulls else None,
        "transfer_bytes": totals.bytes,
        "transfer_seconds_summed": totals.seconds,
        "num_transfers": totals.num_transfers,
        "load_average_1m": [load_before, os.getloadavg()[0]],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--output", default="bench/results/cluster_serving_cpu.json")
    args = p.parse_args()
    env = environment()
    cluster = FakeCluster()
    try:
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        ray.init(address=cluster.address, _node_ip_address=HEAD_IP, log_to_driver=False,
                 logging_level="WARNING")  # fmt: skip
        runs: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
        for repeat in range(args.repeats):
            for name, nodes in LAYOUTS.items():
                result = run_layout(cluster.address, nodes, args)
                print(f"repeat {repeat} {name}: {json.dumps(result)}", flush=True)
                runs[name].append(result)
        ray.shutdown()
    finally:
        cluster.kill()
    summary = {
        name: {
            key: statistics.median(r[key] for r in rs)
            for key in ("wall_s", "tokens_per_s", "mean_ttft_s", "mean_tpot_s", "mean_pull_s")
            if all(r[key] is not None for r in rs)
        }
        | {"transport": rs[0]["transport"]}
        for name, rs in runs.items()
    }
    out = {
        "environment": env,
        "workload": {
            "model": "dummy:llama-tiny",
            "num_requests": args.num_requests,
            "prompt_len": args.prompt_len,
            "output_len": args.output_len,
            "arrivals": "closed batch (all at once)",
            "repeats": args.repeats,
            "cluster": "2 fake Ray nodes on this machine (127.0.0.2, 127.0.0.3), UCX_TLS=tcp",
        },  # fmt: skip
        "summary_median": summary,
        "runs": runs,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
