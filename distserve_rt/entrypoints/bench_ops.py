"""`drt-run bench-ops`: placeholder until the op microbenchmarks land."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("bench-ops", help="run the op microbenchmarks and print a table")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError("bench-ops is not implemented yet")
