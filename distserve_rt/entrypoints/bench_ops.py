"""`drt-run bench-ops`: the op microbenchmarks on CPU, printed as a table.

Each op is checked against an fp32 reference first, then timed beside a torch baseline in
the same process (the ratio is what holds across machines).
"""

from __future__ import annotations

import argparse

from distserve_rt import _native
from distserve_rt.benchmarks.environment import environment, save_result
from distserve_rt.benchmarks.op_cases import default_cpu_cases
from distserve_rt.benchmarks.op_suite import format_table, run_suite


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench-ops",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="smaller shapes, shorter runs")
    p.add_argument(
        "--threads", type=int, default=None, help="threads of our CPU kernels and of torch"
    )
    p.add_argument(
        "--min-time", type=float, default=0.3, help="seconds of timed runs per measurement"
    )
    p.add_argument("--json", default=None, help="also save the results to this JSON file")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        _native.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    if args.min_time <= 0:
        raise SystemExit(f"--min-time must be > 0, got {args.min_time}")
    results = run_suite(default_cpu_cases(quick=args.quick), min_time_s=args.min_time)
    env = environment()
    print(
        f"\ndistserve_rt {env['versions']['distserve_rt']} @ {env['git_commit']}  "  # type: ignore[index]
        f"cpu: {env['machine']['cpu']}  threads: {env['threads']}"  # type: ignore[index]
    )
    print(format_table(results))
    if args.json:
        path = save_result(args.json, {"results": [r.to_dict() for r in results]})
        print(f"saved {path}")
    return 0
