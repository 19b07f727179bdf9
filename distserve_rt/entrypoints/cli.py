"""`drt-run`: the command-line entry point."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drt-run", description="distserve_rt: disaggregated prefill/decode LLM serving"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from distserve_rt.entrypoints import bench_ops, bench_serving, generate, plan, simulate

    bench_ops.add_parser(sub)
    bench_serving.add_parser(sub)
    simulate.add_parser(sub)
    plan.add_parser(sub)
    generate.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
