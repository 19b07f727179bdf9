"""`drt-run`: the command-line entry point."""

from __future__ import annotations

import argparse
import importlib
import sys

# One subcommand per module of distserve_rt.entrypoints; each has add_parser(subparsers),
# which registers the command and its handler. In the order `drt-run --help` lists them.
COMMANDS = (
    "serve",
    "generate",
    "bench_serving",
    "plan",
    "simulate",
    "profile",
    "bench_ops",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drt-run", description="distserve_rt: disaggregated prefill/decode LLM serving"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"distserve_rt.entrypoints.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
