"""Run a Python module as the GPU machine would: without the HTTP server's packages.

The H200 machine has no fastapi, uvicorn, starlette or pydantic (and no network to install
them), so a test collection or a `drt-run` command that imports them there fails before it
measures anything. Running it here through this wrapper shows that first, at no device cost:

    python bench/gpu/no_server_deps.py -m pytest --collect-only -q -m cuda tests
    python bench/gpu/no_server_deps.py -m distserve_rt.entrypoints.cli bench --help

Each of those names then imports as if it were not installed (ModuleNotFoundError, which
`pytest.importorskip` turns into a skip).
"""

from __future__ import annotations

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


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] != "-m":
        sys.exit(f"usage: no_server_deps.py -m MODULE [ARGS...]; got {' '.join(argv) or 'nothing'}")
    sys.meta_path.insert(0, _Absent())
    sys.argv = [argv[1], *argv[2:]]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
