"""Layers import downward only: the rules below, checked on the source of every module.

Every ``import x`` and ``from x import y`` counts, at module level, inside functions and under
``TYPE_CHECKING`` alike (a function-level import is still a dependency, only a later one);
relative imports are resolved against the importing module, and ``from distserve_rt import
LLM`` against the lazy top-level table (`distserve_rt._LAZY`).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import distserve_rt

PACKAGE_DIR = Path(distserve_rt.__file__).parent

# importing layer -> layers it must not import (first component below distserve_rt).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    **{
        low: ("engine", "entrypoints")
        for low in ("worker", "core", "ops", "transfer", "layers", "models")
    },
    "config": ("engine", "worker", "entrypoints"),
    "engine": ("entrypoints",),
}


@dataclass(frozen=True)
class Violation:
    path: str
    lineno: int
    imported: str

    def __str__(self) -> str:
        return f"{self.path}:{self.lineno} imports {self.imported}"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """``(line, module)`` for every import in `source` (the module `module`), relative ones
    resolved. ``from a import b`` yields ``a.b`` (b may be a submodule; for a plain name
    the prefix rules still see ``a``), and names of the lazy top level their module."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                if base == "distserve_rt" and alias.name in distserve_rt._LAZY:
                    found.append((node.lineno, distserve_rt._LAZY[alias.name]))
                else:
                    found.append((node.lineno, f"{base}.{alias.name}"))
    return found


def layer_violations(source: str, module: str, path: str, is_package: bool) -> list[Violation]:
    """The imports of `source` that break `FORBIDDEN` for the layer `module` belongs to."""
    parts = module.split(".")
    forbidden = FORBIDDEN.get(parts[1], ()) if len(parts) > 1 else ()
    violations = []
    for lineno, imported in imported_modules(source, module, is_package):
        target = imported.split(".")
        if len(target) > 1 and target[0] == "distserve_rt" and target[1] in forbidden:
            violations.append(Violation(path, lineno, imported))
    return violations


def test_layers_import_downward_only():
    violations = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE_DIR.parent))
        violations += layer_violations(
            path.read_text(), module_name(path), rel, path.name == "__init__.py"
        )
    assert not violations, "upward imports:\n" + "\n".join(map(str, violations))


@pytest.mark.parametrize(
    ("module", "is_package", "source", "expected"),
    [
        (
            "distserve_rt.worker.worker",
            False,
            "import distserve_rt.engine.llm",
            "1 imports distserve_rt.engine.llm",
        ),
        (
            "distserve_rt.core.x",
            False,
            "from distserve_rt.engine import llm",
            "1 imports distserve_rt.engine.llm",
        ),
        (
            "distserve_rt.transfer.shm",
            False,
            "import os\n\ndef f():\n    from ..entrypoints.cli import main\n",
            "4 imports distserve_rt.entrypoints.cli.main",
        ),
        (
            "distserve_rt.config",
            True,
            "from ..worker import worker",
            "1 imports distserve_rt.worker.worker",
        ),
        (
            "distserve_rt.config.engine",
            False,
            "from ..engine import llm",
            "1 imports distserve_rt.engine.llm",
        ),
        (
            "distserve_rt.ops.cache",
            False,
            "from distserve_rt import LLM",
            "1 imports distserve_rt.engine.llm",
        ),
        (
            "distserve_rt.engine.llm",
            False,
            "from distserve_rt import entrypoints",
            "1 imports distserve_rt.entrypoints",
        ),
    ],
)
def test_checker_catches_an_upward_import(module, is_package, source, expected):
    """The message names the file, the line and the imported module."""
    found = layer_violations(source, module, "fake.py", is_package)
    assert [str(v) for v in found] == [f"fake.py:{expected}"]


def test_checker_allows_downward_and_sibling_imports():
    source = (
        "from distserve_rt.config import EngineConfig\n"
        "from . import base\n"
        "import distserve_rt.ops\n"
        "from distserve_rt import SamplingParams\n"
    )
    assert layer_violations(source, "distserve_rt.worker.worker", "w.py", False) == []
    assert (
        layer_violations("import distserve_rt.entrypoints", "distserve_rt.planner.x", "p", False)
        == []
    )


@pytest.mark.parametrize("module", ["distserve_rt._C", "distserve_rt.ops", "distserve_rt.transfer"])
def test_low_layers_import_no_serving_code(module):
    """The top level is lazy: importing kernels or transports loads no engine, worker or
    entrypoint module (a subprocess: this one has imported them already)."""
    code = (
        f"import sys, {module}\n"
        "serving = ('engine', 'entrypoints', 'worker')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[1:2] in ([s] for s in serving))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE_DIR.parent)


def test_lazy_top_level_keeps_its_public_names():
    code = (
        "import distserve_rt, sys\n"
        "assert 'distserve_rt.engine' not in sys.modules\n"
        "from distserve_rt import LLM, SamplingParams, ops\n"
        "assert LLM.__module__ == 'distserve_rt.engine.llm'\n"
        "assert ops.__name__ == 'distserve_rt.ops'\n"
        "assert set(distserve_rt.__all__) <= set(dir(distserve_rt))\n"
        "assert all(getattr(distserve_rt, n) is not None for n in distserve_rt.__all__)\n"
        "try:\n"
        "    distserve_rt.NoSuchName\n"
        "except AttributeError as exc:\n"
        "    assert 'NoSuchName' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE_DIR.parent)
