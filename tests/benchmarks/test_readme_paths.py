"""The READMEs a reader follows name only files inside the repository: a path that leaves
it (``../shared/...``, an absolute path on a developer's machine) is a dead end for anyone
with a clone. Temporary folders that a documented command creates (``/tmp/...``) and the
standard per-user caches every user has (``~/.cache/huggingface/hub``, where models are
looked up) are fine."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# `code` spans and (link) targets that look like relative or absolute file paths.
PATH = re.compile(r"`([^`\s]+)`|\]\(([^)\s]+)\)")
# Absolute paths of someone's machine (an HTTP route such as /v1/models is not a file).
MACHINE_ROOTS = ("/work/", "/home/", "/root/", "/Users/", "/opt/", "/mnt/", "/data/", "~")


@pytest.mark.parametrize("readme", ["README.md", "bench/README.md"])
def test_readme_names_no_file_outside_the_repository(readme):
    doc = REPO / readme
    escaping = []
    for match in PATH.finditer(doc.read_text(encoding="utf-8")):
        target = match.group(1) or match.group(2)
        if "://" in target or target.startswith(("/tmp/", "~/.cache/", "$", "-", "#")):
            continue
        if target.startswith(MACHINE_ROOTS):
            escaping.append(target)
        elif target.startswith(".."):
            resolved = (doc.parent / target).resolve()
            # `../x` from bench/ must land in the clone and exist there (the old link to
            # ../shared/BENCHMARKS.md meant a folder beside the repository).
            if not resolved.is_relative_to(REPO) or not resolved.exists():
                escaping.append(target)
    assert not escaping, f"{readme} names files outside the repository: {escaping}"
