"""Generates the host-compilable copies of the CUDA sources for the CPU emulation build.

The kernels and launchers are compiled unchanged except for what C++ cannot parse:
  * ``k<<<grid, block, smem, stream>>>(args)`` becomes
    ``::drt_emu::launch("k", ::drt_emu::LaunchConfig(grid, block, smem, stream), k, args)``;
  * ``__shared__ T name[dims];`` becomes a reference to a per-CTA guarded buffer
    (``::drt_emu::shared_var``), ``extern __shared__ T name[];`` a pointer to the launch's
    dynamic shared memory (``::drt_emu::dynamic_shared``);
  * a kernel's ``__launch_bounds__(N)`` adds a check of the block size at the top of its
    body (``::drt_emu::check_launch_bounds``: on a GPU a larger block fails to launch);
  * the two headers with inline PTX (mma.cuh, cp_async.cuh) are replaced by their host
    variants in csrc/cuda_emu/ptx/.
Each output starts with ``#line 1 "<original path>"`` and keeps every line where it was, so
errors and the emulator's messages point at the real source lines.

Usage: generate.py --root REPO --out DIR --headers REL... --sources REL...
  headers land in DIR/include/<path below include/>, sources in DIR/src/<name>.cpp.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HOST_VARIANTS = {
    "distserve_rt/cuda/mma.cuh": "csrc/cuda_emu/ptx/mma.cuh",
    "distserve_rt/cuda/cp_async.cuh": "csrc/cuda_emu/ptx/cp_async.cuh",
}

_DYNAMIC_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:(?:__align__|alignas)\s*\(\s*\d+\s*\)\s*)?"
    r"(?P<type>[\w:<>, ]+?)\s+(?P<name>\w+)\s*\[\s*\]\s*;"
)
_STATIC_SHARED = re.compile(
    r"__shared__\s+(?:(?:__align__|alignas)\s*\(\s*\d+\s*\)\s*)?"
    r"(?P<type>[\w:<>, ]+?)\s+(?P<name>\w+)\s*(?P<dims>(?:\[[^\];]*\]\s*)*);"
)


def _matching_back(text: str, end: int, open_ch: str, close_ch: str) -> int:
    """Index of the `open_ch` matching the `close_ch` at text[end]."""
    depth = 0
    for i in range(end, -1, -1):
        if text[i] == close_ch:
            depth += 1
        elif text[i] == open_ch:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {open_ch}{close_ch} before offset {end}")


def _matching_forward(text: str, start: int, open_ch: str, close_ch: str) -> int:
    """Index of the `close_ch` matching the `open_ch` at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_ch:
            depth += 1
        elif text[i] == close_ch:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {open_ch}{close_ch} after offset {start}")


def _code_only(text: str) -> str:
    """`text` with its comments blanked (same length), so searches skip them."""
    return re.sub(
        r"//[^\n]*|/\*.*?\*/", lambda m: re.sub(r"[^\n]", " ", m[0]), text, flags=re.DOTALL
    )


def rewrite_launches(text: str, path: str) -> str:
    while (start := _code_only(text).find("<<<")) >= 0:
        # The callee: a (qualified) name, possibly with template arguments.
        i = start - 1
        while text[i].isspace():
            i -= 1
        if text[i] == ">":
            i = _matching_back(text, i, "<", ">") - 1
        while i >= 0 and (text[i].isalnum() or text[i] in "_:"):
            i -= 1
        callee_start = i + 1
        callee = text[callee_start:start].strip()
        end = text.find(">>>", start)
        paren = end + 3
        while text[paren].isspace():
            paren += 1
        if end < 0 or text[paren] != "(" or not callee:
            raise ValueError(f"{path}: cannot parse the launch at offset {start}")
        close = _matching_forward(text, paren, "(", ")")
        config, args = text[start + 3 : end], text[paren + 1 : close]
        call = (
            f'::drt_emu::launch("{" ".join(callee.split())}", '
            f"::drt_emu::LaunchConfig({config}), {callee}"
            + (f", {args}" if args.strip() else "")
            + ")"
        )
        text = text[:callee_start] + call + text[close + 1 :]
    return text


def rewrite_launch_bounds(text: str, path: str) -> str:
    pos = 0
    while (start := _code_only(text).find("__launch_bounds__", pos)) >= 0:
        paren = text.index("(", start)
        close = _matching_forward(text, paren, "(", ")")
        max_threads = text[paren + 1 : close].split(",")[0].strip()
        brace = _code_only(text).find("{", close)
        if brace < 0:
            raise ValueError(f"{path}: no kernel body after the __launch_bounds__ at {start}")
        check = f" ::drt_emu::check_launch_bounds({max_threads}, __FILE__, __LINE__);"
        text = text[: brace + 1] + check + text[brace + 1 :]
        pos = brace
    return text


def rewrite_shared(text: str, path: str) -> str:
    if "__shared__" not in _code_only(text):
        return text
    text = _DYNAMIC_SHARED.sub(
        lambda m: (
            f"{m['type']}* {m['name']} = static_cast<{m['type']}*>(::drt_emu::dynamic_shared());"
        ),
        text,
    )
    text = _STATIC_SHARED.sub(
        lambda m: (
            f"auto& {m['name']} = ::drt_emu::shared_var<{m['type']}"
            f"{''.join(m['dims'].split())}>(__FILE__, __LINE__);"
        ),
        text,
    )
    for lineno, line in enumerate(_code_only(text).splitlines(), 1):
        if "__shared__" in line:
            raise ValueError(f"{path}:{lineno}: a __shared__ declaration generate.py cannot parse")
    return text


def _rewrite(text: str, path: str) -> str:
    return rewrite_shared(rewrite_launch_bounds(rewrite_launches(text, path), path), path)


def _write_if_changed(path: Path, text: str) -> None:
    # Unchanged outputs keep their time stamps: ninja then rebuilds only what changed.
    if path.exists() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def generate(root: Path, out: Path, headers: list[str], sources: list[str]) -> None:
    for rel in headers:
        below_include = str(Path(rel).relative_to("include"))
        src_rel = HOST_VARIANTS.get(below_include, rel)
        text = (root / src_rel).read_text()
        if src_rel == rel:
            text = _rewrite(text, rel)
        _write_if_changed(out / "include" / below_include, f'#line 1 "{src_rel}"\n{text}')
    for rel in sources:
        text = _rewrite((root / rel).read_text(), rel)
        _write_if_changed(out / "src" / (Path(rel).stem + ".cpp"), f'#line 1 "{rel}"\n{text}')


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--headers", nargs="*", default=[])
    parser.add_argument("--sources", nargs="*", default=[])
    args = parser.parse_args(argv)
    generate(args.root, args.out, args.headers, args.sources)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
