"""Run a Python module or script as the GPU machine would: without the HTTP server's packages.

The H200 machine has no fastapi, uvicorn, starlette or pydantic (and no network to install
them), so a test collection or a `drt-run` command that imports them there fails before it
measures anything. Running it here through this wrapper shows that first, at no device cost:

    python bench/gpu/no_server_deps.py -m pytest --collect-only -q -m cuda tests
    python bench/gpu/no_server_deps.py -m distserve_rt.entrypoints.cli bench --help

Each of those names then imports as if it were not installed (ModuleNotFoundError, which
`pytest.importorskip` turns into a skip).

--flags-only (the dry run of bench/gpu/first_run.sh and second_run.sh): the program runs
until its argparse command line is parsed, then stops with exit 0 and prints the parsed
flags; a wrong flag or value fails as it would on the GPU machine, before any GPU work:

    python bench/gpu/no_server_deps.py --flags-only bench/gpu/bench_kernels.py --quick
"""

from __future__ import annotations

import argparse
import importlib.abc
import runpy
import sys

SERVER_PACKAGES = frozenset({"fastapi", "uvicorn", "starlette", "pydantic", "pydantic_core"})


class _Absent(importlib.abc.MetaPathFinder):
    """Answers for the server packages before any real finder can find them."""

    def find_spec(self, fullname, path, target=None):
        if fullname.partition(".")[0] in SERVER_PACKAGES:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


def hide_server_packages() -> None:
    """From now on, importing a server package fails as if it were not installed."""
    sys.meta_path.insert(0, _Absent())


class FlagsParsed(SystemExit):
    """Raised by the patched parse_args once the program's command line has parsed."""


def stop_after_parsing() -> None:
    # parse_args, not parse_known_args: subcommand parsers call the latter from inside the
    # outer parse, which must run to its end (its unknown-argument check included).
    parse_args = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        parsed = parse_args(self, args, namespace)
        shown = {k: v for k, v in vars(parsed).items() if not callable(v)}
        print(f"flags ok ({self.prog}): {shown}")
        raise FlagsParsed(0)

    argparse.ArgumentParser.parse_args = parse_and_stop


USAGE = "usage: no_server_deps.py [--flags-only] (-m MODULE | SCRIPT) [ARGS...]"


def main(argv: list[str]) -> None:
    if argv[:1] == ["--flags-only"]:
        argv = argv[1:]
        stop_after_parsing()
    if not argv or (argv[0] == "-m" and len(argv) < 2):
        sys.exit(f"{USAGE}; got {' '.join(argv) or 'nothing'}")
    hide_server_packages()
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
