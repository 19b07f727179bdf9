"""Each public class name means one thing: no two modules of the package define a class of
the same name (a reader meeting ``InstanceSpec`` or ``ServingMetrics`` should not have to
check which one it is)."""

import ast
import collections
from pathlib import Path

import distserve_rt

PACKAGE_DIR = Path(distserve_rt.__file__).parent


def duplicate_class_names(sources: dict[str, str]) -> dict[str, list[str]]:
    """``{class name: [paths]}`` of the public module-level classes defined more than once."""
    where = collections.defaultdict(list)
    for path, source in sources.items():
        for node in ast.parse(source).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                where[node.name].append(path)
    return {name: paths for name, paths in where.items() if len(paths) > 1}


def test_public_class_names_are_defined_once():
    sources = {
        str(p.relative_to(PACKAGE_DIR.parent)): p.read_text() for p in PACKAGE_DIR.rglob("*.py")
    }
    assert duplicate_class_names(sources) == {}


def test_duplicate_finder_names_both_places():
    sources = {"a.py": "class Spec:\n    pass\n", "b.py": "class Spec: ...\nclass _Private: ..."}
    sources["c.py"] = "class _Private: ..."
    assert duplicate_class_names(sources) == {"Spec": ["a.py", "b.py"]}
