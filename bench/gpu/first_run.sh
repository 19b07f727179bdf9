#!/usr/bin/env bash
# The first run on the H200 (issue 14): one device call that says whether the CUDA kernels
# are right, before anything is measured at length. Stages, in order of what decides most:
#   env           GPU, driver, nvcc, torch/CUDA versions, packages, CPU count
#   build         both native modules from source, CUDA module forced on (DRT_CUDA=ON), for
#                 sm_90a only, with ptxas -v (registers, spills, shared memory per kernel)
#   sass          the ptxas table, and instruction counts per kernel from the SASS
#   kernel_tests  every `cuda`-marked test under tests/kernels (the decisive stage)
#   bench_quick   bench_kernels.py --quick: one case per op against SDPA / copy bandwidth
#   racecheck, memcheck, synccheck
#                 compute-sanitizer over bench/gpu/every_op.py (each kernel once, small)
#   integration   the other `cuda` tests: cuda_ipc transfers, disaggregated e2e on one GPU,
#                 models, sampling, KV sizing
# It stops itself inside DRT_GPU_BUDGET_S (default 540 s, under the device tool's 600 s per
# command): each stage runs under its own cap, cut to what is left. See stages.sh.
#
# The 8 files in $OUT (the device tool brings back 8), all created at the start so that
# every one comes back, whatever happens:
#   summary.txt       stage table (ok / FAILED / CUT / SKIPPED / not reached, seconds,
#                     limit, log) and the environment report: read this first
#   build.log         cmake configure + build output, ptxas -v lines included
#   sass.txt          ptxas table (regs, spills, smem per kernel) + SASS opcode counts
#   kernel_tests.log  pytest -m cuda tests/kernels (-rfEs: every failure and skip reason)
#   bench_quick.log   the quick benchmark's table
#   gpu_kernels.json  its JSON (for bench/results/), or why there is none
#   sanitizer.log     racecheck, memcheck and synccheck reports, one after the other
#   integration.log   pytest -m cuda tests --ignore=tests/kernels
#
# Usage (on the device machine, repository root):
#   bash bench/gpu/first_run.sh              # files under $OUT (default bench/results/gpu)
#   bash bench/gpu/first_run.sh --dry-run    # here, without a GPU: stubs (stages.sh)
# Exit status 0 only when every stage passed.
set -uo pipefail
SCRIPT=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
# shellcheck source=stages.sh
. "$(dirname "$SCRIPT")/stages.sh"
RUN_NAME=first_run.sh
STAGES=(env build sass kernel_tests bench_quick racecheck memcheck synccheck integration)
FILES=(summary.txt build.log sass.txt kernel_tests.log bench_quick.log gpu_kernels.json
       sanitizer.log integration.log)

stage_sass() {
  echo "== ptxas (-Xptxas -v, sm_90a): kernel | registers | spill stores/loads (bytes) | smem"
  ptxas_table "$OUT/build.log"
  echo
  local so cuobjdump
  so=$(ls distserve_rt/_cuda*.so 2>/dev/null | head -1)
  cuobjdump=$(command -v cuobjdump || find_cuda_tool cuobjdump) || {
    echo "== SASS: cuobjdump not found (not on PATH, not beside nvcc, not in /usr/local/cuda/bin):"
    echo "   no instruction counts; pip's nvidia-cuda-cuobjdump wheel carries it"
    return 0
  }
  [ -n "$so" ] || { echo "== SASS: no distserve_rt/_cuda*.so (the build did not produce it)"; return 1; }
  # The dump itself (megabytes) stays behind: only the counts come back.
  local dump
  dump=$(mktemp)
  "$cuobjdump" --dump-sass "$so" >"$dump" || { rm -f "$dump"; return 1; }
  sass_counts "$dump"
  rm -f "$dump"
}

# One row per kernel from ptxas' three lines (entry, spills, registers/smem), demangled.
ptxas_table() {
  awk '
    /Compiling entry function/ { split($0, q, "'\''"); fn = q[2]; st = "?"; ld = "?" }
    /bytes spill stores/ { st = $5; ld = $9 }
    /Used [0-9]+ registers/ {
      regs = $0; sub(/.*Used /, "", regs); sub(/ registers.*/, "", regs)
      smem = "0"; if (match($0, /[0-9]+ bytes smem/)) smem = substr($0, RSTART, RLENGTH - 11)
      if (fn != "") print fn " | " regs " | " st "/" ld " | " smem; fn = ""
    }' "$1" | demangle | sort
  awk '/bytes spill stores/ && ($5 != 0 || $9 != 0) { n++ } END { print (n + 0) " kernels spill" }' "$1"
}

# Opcode counts per kernel: the families issue 14 predicts on first (HMMA, LDSM, LDGSTS,
# LDS widths, local memory, MUFU, CALL = div/mod subroutines, BAR), then every opcode.
sass_counts() {
  local counts
  counts=$(mktemp)
  awk '
    /Function :/ { fn = $3; next }
    /^[ \t]+\/\*[0-9a-f]+\*\// {
      line = $0; sub(/^[ \t]+\/\*[0-9a-f]+\*\/[ \t]+/, "", line); sub(/[ \t]*;.*/, "", line)
      n = split(line, tok, /[ \t]+/); op = tok[1]
      if (op ~ /^@/) op = tok[2]
      count[fn "\t" op]++; total[fn]++
    }
    END { for (k in count) print k "\t" count[k]; for (f in total) print f "\tTOTAL\t" total[f] }
  ' "$1" | sort >"$counts"
  echo "== SASS: instructions of interest per kernel (opcode=count)"
  awk -F'\t' '
    $2 ~ /^(TOTAL|HMMA|HGMMA|LDSM|LDGSTS|LDS|STS|LDL|STL|MUFU|CALL|BAR)/ { row[$1] = row[$1] " " $2 "=" $3 }
    END { for (f in row) print f " |" row[f] }' "$counts" | demangle | sort
  echo
  echo "== SASS: every opcode per kernel (kernel | opcode | count)"
  awk -F'\t' '{ print $1 " | " $2 " | " $3 }' "$counts" | demangle
  rm -f "$counts"
}

demangle() { if command -v c++filt >/dev/null; then c++filt; else cat; fi; }

stage_kernel_tests() {
  "${PYTEST[@]}" -q -m cuda -p no:cacheprovider -rfEs --tb=short --durations=10 tests/kernels
}

stage_bench_quick() {
  # bench_kernels.py writes a PNG beside its JSON: only the JSON comes back (8 files).
  local dir rc
  dir=$(mktemp -d)
  "${PYFLAGS[@]}" bench/gpu/bench_kernels.py --quick --out "$dir"
  rc=$?
  if [ -f "$dir/gpu_kernels.json" ]; then
    cp "$dir/gpu_kernels.json" "$OUT/gpu_kernels.json"
  else
    printf '{"status": "bench_kernels.py wrote no JSON (exit %s, dry run: %s): see bench_quick.log"}\n' \
      "$rc" "$DRT_GPU_DRY_RUN" >"$OUT/gpu_kernels.json"
  fi
  rm -rf "$dir"
  return $rc
}

# compute-sanitizer slows each launch 10-100x: every_op.py runs each kernel once, small.
# The transfer pull (a second process) and the memcpy-batch copy (no kernel of ours) run
# under memcheck only.
sanitize() {
  local tool=$1 sanitizer
  shift
  sanitizer=$(command -v compute-sanitizer || find_cuda_tool compute-sanitizer) ||
    { echo "compute-sanitizer not found"; return 1; }
  "$sanitizer" --tool "$tool" --error-exitcode 9 --print-limit 20 \
    "${PYRUN[@]}" bench/gpu/every_op.py --device "$OP_DEVICE" "$@"
}
KERNEL_OPS=(prefill_bf16_d128 prefill_fp16_d64 prefill_paged_bf16 prefill_fp32 decode_bf16
            decode_fp32 decode_split_bf16 write_kv copy_blocks)
stage_racecheck() { sanitize racecheck --only "${KERNEL_OPS[@]}"; }
stage_memcheck() { sanitize memcheck; }
stage_synccheck() { sanitize synccheck --only "${KERNEL_OPS[@]}"; }

stage_integration() {
  "${PYTEST[@]}" -q -m cuda -p no:cacheprovider -rfEs --tb=short --durations=10 tests \
    --ignore=tests/kernels
}

if [ "${1:-}" = --stage ]; then  # one stage, run by `stage` in a fresh bash under timeout
  python_launchers
  "stage_$2"
  exit $?
fi

gpu_setup "$@"
for f in "${FILES[@]}"; do [ -e "$OUT/$f" ] || : >"$OUT/$f"; done
[ -s "$OUT/gpu_kernels.json" ] || echo '{"status": "bench_quick not run"}' >"$OUT/gpu_kernels.json"
echo "first_run.sh: budget ${DRT_GPU_BUDGET_S}s, OUT=$OUT, dry run: $DRT_GPU_DRY_RUN"

stage env 20 summary.txt
stage build 240 build.log
stage sass 30 sass.txt build
stage kernel_tests 180 kernel_tests.log build
stage bench_quick 75 bench_quick.log build
stage racecheck 60 sanitizer.log build
stage memcheck 60 sanitizer.log build
stage synccheck 45 sanitizer.log build
stage integration 150 integration.log build

finish_summary
echo
cat "$OUT/summary.txt"
dry_run_report || exit 1
all_passed
