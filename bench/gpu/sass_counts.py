"""Counts the SASS instructions that matter per CUDA kernel, from the compiled cubins.

No GPU needed: nvcc compiles the launchers to cubins (or a built _cuda .so / cubin is
given), nvdisasm (PyPI nvidia-cuda-nvdisasm; cuobjdump for a .so) prints the SASS, and
this script counts per kernel what bench/gpu/NOTES.md reasons about:

    lds_u16 / lds_32 / lds_64 / lds_128   shared-memory loads by width
    ldsm, hmma, ldgsts                    ldmatrix, tensor-core mma, cp.async
    mufu_ex2, mufu_rcp                    special-function unit (exp2, reciprocal)
    ex2_range_checks                      IEEE exp2f's guard (FSETP.GEU x, -126) before
                                          MUFU.EX2, with two fix-up FMULs: 0 with ex2.approx
    int_div32                             inline 32-bit division/modulo sequences by a
                                          runtime divisor (each starts with I2F[.U32].RP)
    calls                                 CALL.REL to nvcc's subroutines by name (div_s64,
                                          rem_s64: 64-bit / and %; rcp_rn_f32_slowpath: an
                                          IEEE 1/x whose fast path missed)
    ldl, stl                              local memory (spills, indexed arrays)
    total                                 instructions of the kernel body (NOPs and the
                                          subroutine bodies left out)

plus the ptxas -v registers / spill bytes / static shared memory. Usage:

    python bench/gpu/sass_counts.py --out build/sass/now            # compile, sm_90a + sm_80
    python bench/gpu/sass_counts.py --cubin a.cubin --out DIR       # existing cubins
    python bench/gpu/sass_counts.py --so distserve_rt/_cuda*.so --out DIR
Writes DIR/sass_counts.json and DIR/sass_counts.md (the table is printed too; with
--summary REGEX only the matching kernels, sm_90a counts with sm_80 registers beside).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("decode_attention", "prefill_attention", "cache_ops")
ARCHS = ("90a", "80")
# Flags of the CMake build (CMakeLists.txt, target _cuda) so the counts are the module's.
NVCC_FLAGS = ("-std=c++17", "--expt-relaxed-constexpr", "-O3", "-lineinfo")
COLUMNS = (
    "lds_u16", "lds_32", "lds_64", "lds_128", "ldsm", "hmma", "ldgsts", "mufu_ex2",
    "mufu_rcp", "ex2_range_checks", "int_div32", "div_calls", "ldl", "stl", "total",
)  # fmt: skip

_KERNEL = re.compile(r"^\.text\.(\S+):\s*$")
# nvcc's helpers ($__internal_3_$__cuda_sm20_div_s64) and non-inlined device functions
# ($<kernel>$<function>) follow the kernel in its section.
_SUBROUTINE = re.compile(r"^\$\S+:\s*$")
_INSTR = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")
_CALL_TARGET = re.compile(r"`\(\$(?:\S*\$)?(?:__cuda_sm\d+_)?(\w+)\)")
_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\w+)'")
_PTXAS_PROPS = re.compile(r"Function properties for (\S+)")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def _count_opcode(counts: Counter, op: str, operands: str) -> None:
    if op.startswith("LDSM"):
        counts["ldsm"] += 1
    elif op.startswith("LDS"):
        width = {".U16": "lds_u16", ".S16": "lds_u16", ".64": "lds_64", ".128": "lds_128"}
        counts[next((v for k, v in width.items() if k in op), "lds_32")] += 1
    elif op.startswith("HMMA"):
        counts["hmma"] += 1
    elif op.startswith("LDGSTS"):
        counts["ldgsts"] += 1
    elif op == "MUFU.EX2":
        counts["mufu_ex2"] += 1
    elif op in ("MUFU.RCP", "MUFU.RCP64H"):
        counts["mufu_rcp"] += 1
    elif op.startswith("I2F") and op.endswith(".RP") and ".U64" not in op:
        counts["int_div32"] += 1  # the reciprocal estimate that opens a 32-bit div/mod
    elif op.startswith("FSETP.GEU") and operands.rstrip().endswith("-126, PT"):
        counts["ex2_range_checks"] += 1
    elif op.startswith("LDL"):
        counts["ldl"] += 1
    elif op.startswith("STL"):
        counts["stl"] += 1


def parse_nvdisasm(text: str) -> dict[str, dict]:
    """Per kernel (mangled name) counts from `nvdisasm -c` output.

    Instructions after a `$__internal_*` label belong to a subroutine nvcc appended to the
    kernel (64-bit div/rem, slow-path reciprocal): they are counted under `subroutine_total`,
    not `total`, since a kernel runs them only through the CALLs counted in `calls`.
    """
    kernels: dict[str, dict] = {}
    counts: Counter | None = None
    in_subroutine = False
    for line in text.splitlines():
        if m := _KERNEL.match(line):
            counts = Counter()
            kernels[m.group(1)] = {"counts": counts, "calls": Counter()}
            in_subroutine = False
            continue
        if _SUBROUTINE.match(line):
            in_subroutine = True
            continue
        m = _INSTR.match(line)
        if m is None or counts is None:
            continue
        op = m.group(1)
        if in_subroutine:
            counts["subroutine_total"] += 1
            continue
        if op == "NOP":
            continue
        counts["total"] += 1
        _count_opcode(counts, op, m.group(2))
        if op.startswith("CALL") and (t := _CALL_TARGET.search(m.group(2))):
            kernels[next(reversed(kernels))]["calls"][t.group(1)] += 1
    result = {}
    for name, k in kernels.items():
        row = {c: k["counts"].get(c, 0) for c in COLUMNS if c != "div_calls"}
        row["subroutine_total"] = k["counts"].get("subroutine_total", 0)
        row["calls"] = dict(sorted(k["calls"].items()))
        row["div_calls"] = sum(n for t, n in k["calls"].items() if "div" in t or "rem" in t)
        result[name] = row
    return result


def parse_ptxas(text: str) -> dict[tuple[str, str], dict]:
    """(mangled kernel, arch) -> registers, spill bytes and static shared memory (ptxas -v)."""
    out: dict[tuple[str, str], dict] = {}
    key = None
    props_of = None  # ptxas also reports the kernel's non-inlined callees: skip their lines
    for line in text.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            key = (m.group(1), m.group(2))
            out[key] = {"registers": 0, "spill_bytes": 0, "smem_bytes": 0}
        elif m := _PTXAS_PROPS.search(line):
            props_of = m.group(1)
        elif key and props_of == key[0] and (m := _PTXAS_SPILL.search(line)):
            out[key]["spill_bytes"] = int(m.group(1)) + int(m.group(2))
        elif key and (m := _PTXAS_REGS.search(line)):
            out[key]["registers"] = int(m.group(1))
            out[key]["smem_bytes"] = int(m.group(2) or 0)
    return out


_SHORT_TYPES = {"__nv_bfloat16": "bf16", "__half": "fp16", "float": "fp32", "uint4": "u4"}


def short_name(demangled: str) -> str:
    """`void drt::cuda::decode_split_kernel<__nv_bfloat16, 128, 16>(drt::cuda::DecodeParams)`
    -> `decode_split_kernel<bf16,128,16>`."""
    name = demangled.split("(")[0].removeprefix("void ").strip()
    base, _, args = name.partition("<")
    base = base.rsplit("::", 1)[-1]
    if not args:
        return base
    parts = [a.strip().rsplit("::", 1)[-1] for a in args.rstrip(">").split(",")]
    return f"{base}<{','.join(_SHORT_TYPES.get(a, a) for a in parts)}>"


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), text=True, capture_output=True)
    return {n: short_name(d) for n, d in zip(names, out.stdout.splitlines(), strict=True)}


def _tool(name: str, given: str | None) -> str:
    for candidate in (given, shutil.which(name), os.environ.get(name.upper())):
        if candidate and Path(candidate).exists():
            return candidate
    try:  # the pip wheels (nvidia-cuda-nvdisasm / -cuobjdump) put them under nvidia/cu13/bin
        import nvidia  # type: ignore[import-not-found]

        for root in nvidia.__path__:
            hits = sorted(Path(root).glob(f"cu*/bin/{name}"))
            if hits:
                return str(hits[-1])
    except ImportError:
        pass
    raise SystemExit(f"{name} not found: pass --{name} PATH or pip install nvidia-cuda-{name}")


def compile_cubins(nvcc: str, archs: list[str], work: Path) -> tuple[list[Path], str]:
    """One cubin per (source, arch) with the module's flags; returns them and ptxas -v text."""
    cubins, ptxas = [], []
    for src in SOURCES:
        for arch in archs:
            cubin = work / f"{src}.sm_{arch}.cubin"
            cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", *NVCC_FLAGS, "-Xptxas", "-v"]
            cmd += [
                f"-I{REPO / 'include'}",
                f"-I{REPO / 'csrc'}",
                str(REPO / "csrc/cuda" / f"{src}.cu"),
            ]
            run = subprocess.run([*cmd, "-o", str(cubin)], capture_output=True, text=True)
            if run.returncode != 0:
                raise SystemExit(f"nvcc failed on {src}.cu sm_{arch}:\n{run.stderr[-4000:]}")
            cubins.append(cubin)
            ptxas.append(run.stderr)
    return cubins, "\n".join(ptxas)


def extract_so(cuobjdump: str, so: Path, work: Path) -> list[Path]:
    subprocess.run(
        [cuobjdump, "-xelf", "all", str(so.resolve())], cwd=work, check=True, capture_output=True
    )
    return sorted(work.glob("*.cubin"))


def count(cubins: list[Path], nvdisasm: str, ptxas_text: str) -> list[dict]:
    """Rows of the table: one per (kernel, arch), sorted by kernel name then arch."""
    ptxas = parse_ptxas(ptxas_text)
    rows = []
    for cubin in cubins:
        text = subprocess.run(
            [nvdisasm, "-c", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
        arch = m.group(1) if (m := re.search(r"\.target\s+sm_(\w+)", text)) else "?"
        kernels = parse_nvdisasm(text)
        short = demangle(list(kernels))
        for mangled, row in kernels.items():
            rows.append(
                {"kernel": short[mangled], "arch": arch, **row, **ptxas.get((mangled, arch), {})}
            )
    return sorted(rows, key=lambda r: (r["kernel"], r["arch"]))


def summary(rows: list[dict], pattern: str) -> list[dict]:
    """The sm_90a rows of the kernels matching `pattern`, with sm_80's registers and spills
    beside them (one row per kernel: the NOTES.md tables)."""
    sm80 = {r["kernel"]: r for r in rows if r["arch"] == "80"}
    out = []
    for r in rows:
        if r["arch"] != "90a" or not re.search(pattern, r["kernel"]):
            continue
        other = sm80.get(r["kernel"], {})
        regs = f"{r.get('registers', '')}/{other.get('registers', '')}"
        spills = f"{r.get('spill_bytes', '')}/{other.get('spill_bytes', '')}"
        out.append({**r, "arch": "90a/80", "registers": regs, "spill_bytes": spills})
    return out


def markdown(rows: list[dict]) -> str:
    cols = ["kernel", "arch", "registers", "spill_bytes", *COLUMNS]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for sass_counts.json/.md")
    ap.add_argument("--arch", nargs="+", default=list(ARCHS), help="archs to compile (90a 80)")
    ap.add_argument("--cubin", type=Path, nargs="+", help="count these cubins, compile nothing")
    ap.add_argument("--so", type=Path, help="count the cubins embedded in a built _cuda .so")
    ap.add_argument("--summary", metavar="REGEX", help="print one row per matching kernel")
    ap.add_argument("--nvcc", default=None)
    ap.add_argument("--nvdisasm", default=None)
    ap.add_argument("--cuobjdump", default=None)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    nvdisasm = _tool("nvdisasm", args.nvdisasm)
    with tempfile.TemporaryDirectory() as tmp:
        ptxas_text = ""
        if args.cubin:
            cubins = args.cubin
        elif args.so:
            cubins = extract_so(_tool("cuobjdump", args.cuobjdump), args.so, Path(tmp))
        else:
            nvcc = args.nvcc or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
            cubins, ptxas_text = compile_cubins(nvcc, args.arch, Path(tmp))
        rows = count(cubins, nvdisasm, ptxas_text)
    (args.out / "sass_counts.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = markdown(rows)
    (args.out / "sass_counts.md").write_text(table)
    print(markdown(summary(rows, args.summary)) if args.summary else table)


if __name__ == "__main__":
    main(sys.argv[1:])
