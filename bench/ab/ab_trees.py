"""A/B of two checkouts in one session, runs interleaved (the 2-core dev VM drifts by tens of
percent between minutes, so a number from another session compares with nothing).

    git worktree add --detach /tmp/base <commit>    # build it, or copy the .so files when
    cp distserve_rt/*.so /tmp/base/distserve_rt/    # csrc/ did not change between them
    .venv/bin/python bench/ab/ab_trees.py --base /tmp/base --new . --runs 4 --json out.json

Measures, in a fresh process per run and tree (PYTHONPATH picks the tree):
  step:   `benchmarks.engine_step.step_cost` medians (host cost of a 256-request decode step
          with the model removed), both colocated policies;
  disagg: offline 1P1D on dummy:llama-tiny (48 prompts x 64 tokens, 128 greedy tokens each):
          output tokens/s and the median request TPOT.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

STEP = (
    "import json; from distserve_rt.benchmarks.engine_step import step_cost; "
    "print(json.dumps([step_cost(p)['median_us'] "
    "for p in ('continuous_batching', 'chunked_prefill')]))"
)
DISAGG = Path(__file__).with_name("disagg_offline_job.py")


def _run(tree: Path, argv: list[str]) -> list[float]:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="2")
    out = subprocess.run(
        [sys.executable, *argv], env=env, cwd=tree, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"run in {tree} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, required=True, help="the reference checkout")
    p.add_argument("--new", type=Path, required=True, help="the checkout under test")
    p.add_argument("--runs", type=int, default=4, help="runs per tree and benchmark")
    p.add_argument("--what", nargs="+", choices=["step", "disagg"], default=["step", "disagg"])
    p.add_argument("--json", type=Path, help="save the runs and medians here")
    args = p.parse_args()
    if args.runs < 1:
        raise SystemExit(f"--runs must be >= 1, got {args.runs}")
    trees = {"base": args.base.resolve(), "new": args.new.resolve()}
    jobs = {"step": ["-c", STEP], "disagg": [str(DISAGG)]}
    runs: dict[str, dict[str, list]] = {w: {t: [] for t in trees} for w in args.what}
    for i in range(args.runs):
        for what in args.what:
            for name, tree in trees.items():
                runs[what][name].append(_run(tree, jobs[what]))
                print(f"[{i + 1}/{args.runs}] {what} {name}: {runs[what][name][-1]}", flush=True)
    medians = {
        what: {
            name: [statistics.median(r[k] for r in rows) for k in range(len(rows[0]))]
            for name, rows in by_tree.items()
        }
        for what, by_tree in runs.items()
    }
    labels = {"step": "median us (continuous batching, chunked prefill)",
              "disagg": "median (output tok/s, TPOT ms)"}  # fmt: skip
    for what, by_tree in medians.items():
        for name, values in by_tree.items():
            print(f"{what:6} {name:4} {labels[what]}: {[round(v, 2) for v in values]}")
    if args.json:
        result = {
            "command": " ".join(sys.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "trees": {k: str(v) for k, v in trees.items()},
            "load_average_at_end": list(os.getloadavg()),
            "labels": {w: labels[w] for w in runs},
            "medians": medians,
            "runs": runs,
        }
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
