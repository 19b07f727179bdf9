#!/usr/bin/env bash
# Everything the GPU machine has to do, in one call (device time is short):
#   1. build both native modules from source with the CUDA module forced on (DRT_CUDA=ON),
#      for sm_90a only (the H200), keeping ptxas' register/spill report;
#   2. count tensor-core instructions in the SASS (the prefill kernel must show HMMA);
#   3. run every `cuda`-marked test;
#   4. run the GPU benchmarks (JSON + PNG), printing a short table last;
#   5. run the KV transfer benchmark (cuda_ipc between two processes vs a D2D copy); its
#      rows go into gpu_kernels.json ("kv_transfer") and its table into bench.log;
#   6. serve a tiny model disaggregated (1 prefill + 1 decode process sharing the one GPU,
#      cuda_ipc pulls) vs colocated: `drt-run bench --compare` (command below, at most 4
#      min); its table goes into bench.log, its JSON into gpu_kernels.json
#      ("disagg_vs_colocated"). The disaggregated GPU e2e tests (tests/e2e/test_disagg_gpu.py)
#      run in step 3 with every other `cuda` test.
# Usage: bash bench/gpu/run_all.sh [--quick]     (results under $OUT, else bench/results/gpu)
# At most 8 files land in $OUT (the device tool's limit): build.log, ptxas.txt, sass.txt,
# pytest_cuda.log, pytest_cuda.xml, bench.log, gpu_kernels.json, gpu_kernels.png.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/bench/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BIN=$(dirname "$(command -v "$PY")")
CMAKE=$(command -v cmake || echo "$BIN/cmake")
NINJA=$(command -v ninja || echo "$BIN/ninja")
export PYTHONUNBUFFERED=1
status=0

echo "== build (DRT_CUDA=ON, archs ${DRT_CUDA_ARCHS:-90a})"
start=$(date +%s)
if ! { "$CMAKE" -S . -B build/gpu -G Ninja -DDRT_CUDA=ON -DCMAKE_MAKE_PROGRAM="$NINJA" \
         -DDRT_CUDA_ARCHS="${DRT_CUDA_ARCHS:-90a}" -DPython_EXECUTABLE="$(command -v "$PY")" \
         "-DCMAKE_CUDA_FLAGS=-Xptxas -v" &&
       "$CMAKE" --build build/gpu -j "$(nproc)"; } >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  echo "BUILD FAILED (full log: build.log)"
  exit 1
fi
echo "built in $(($(date +%s) - start)) s"
# One line per kernel: registers, spills, shared memory.
grep -E "Compiling entry|registers|spill" "$OUT/build.log" | paste - - - |
  sed -E 's/ptxas info *: //g; s/Compiling entry function//' >"$OUT/ptxas.txt"
grep -E "spill (stores|loads)" "$OUT/ptxas.txt" | grep -vE " 0 bytes spill stores, 0 bytes spill loads" |
  sed 's/^/SPILLS: /' | head -20

echo "== SASS: tensor-core instructions per kernel"
if command -v cuobjdump >/dev/null; then
  cuobjdump --dump-sass distserve_rt/_cuda*.so >"$OUT/sass.txt" 2>&1
  awk '/Function :/ {name=$3} /HMMA|HGMMA/ {count[name]++} END {for (n in count) print count[n], n}' \
    "$OUT/sass.txt" | sort -rn | head -12
  # Keep only the per-kernel summary: the full dump is larger than what comes back.
  awk '/Function :/ {name=$3} /HMMA|HGMMA|LDSM|LDGSTS|STL|LDL/ {split($0, a, /[ ;]+/); for (i in a) if (a[i] ~ /^(HMMA|HGMMA|LDSM|LDGSTS|STL|LDL)/) c[name" "a[i]]++} END {for (k in c) print c[k], k}' \
    "$OUT/sass.txt" | sort -k2 >"$OUT/sass.summary" && mv "$OUT/sass.summary" "$OUT/sass.txt"
else
  echo "cuobjdump not found" | tee "$OUT/sass.txt"
fi

echo "== cuda tests"
"$PY" -m pytest -q -m cuda tests -p no:cacheprovider --junitxml="$OUT/pytest_cuda.xml" \
  >"$OUT/pytest_cuda.log" 2>&1 || status=1
tail -25 "$OUT/pytest_cuda.log"

# memcheck over the CPU-vs-CUDA agreement tests (a subset: memcheck slows kernels ~100x).
# Appended to pytest_cuda.log: the device tool brings back at most 8 files.
echo "== compute-sanitizer memcheck"
if command -v compute-sanitizer >/dev/null; then
  { echo; echo "== compute-sanitizer --tool memcheck"
    compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
      "$PY" -m pytest -q -x -m cuda tests/kernels/test_cuda_module.py -p no:cacheprovider \
      -k "not graph"; } >>"$OUT/pytest_cuda.log" 2>&1 || status=1
  grep -E "ERROR SUMMARY|passed|failed" "$OUT/pytest_cuda.log" | tail -3
else
  echo "compute-sanitizer not found" | tee -a "$OUT/pytest_cuda.log"
fi

echo "== GPU benchmarks"
"$PY" bench/gpu/bench_kernels.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | tail -60
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== KV transfer benchmark (cuda_ipc, two processes)"
"$PY" bench/gpu/bench_transfer.py --out "$OUT" "$@" 2>&1 | tee -a "$OUT/bench.log" | tail -20
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== disaggregated 1P1D sharing the GPU vs colocated (dummy:llama-tiny, bf16)"
# --quick: one rate, fewer requests. The per-run JSONs stay in a temporary folder (the
# device tool brings back 8 files); the comparison is merged into gpu_kernels.json.
if [ "${1:-}" = "--quick" ]; then rates=(20); num_prompts=50; else rates=(20 80); num_prompts=200; fi
cmp_dir=$(mktemp -d)
timeout 240 "$PY" -m distserve_rt.entrypoints.cli bench --device cuda --dtype bfloat16 \
  --share-gpus --gpu-memory-utilization 0.3 --compare disaggregated colocated \
  --dataset-name random --random-input-len 512 --random-output-len 128 \
  --num-prompts "$num_prompts" --request-rate "${rates[@]}" --max-model-len 1024 \
  --max-num-seqs 64 --slo-ttft-ms 100 --slo-tpot-ms 20 --disable-tqdm --save-result \
  --result-dir "$cmp_dir" --result-filename disagg_vs_colocated_gpu.json \
  2>&1 | tee -a "$OUT/bench.log" | tail -8
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
"$PY" - "$cmp_dir/disagg_vs_colocated_gpu.json" "$OUT" <<'PYEOF' || status=1
import json, pathlib, sys
src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
if not src.exists():
    sys.exit(f"no {src}: the comparison did not finish (see bench.log)")
merged = out / "gpu_kernels.json"
target = merged if merged.exists() else out / src.name
data = json.loads(merged.read_text()) if merged.exists() else {}
data["disagg_vs_colocated"] = json.loads(src.read_text())
target.write_text(json.dumps(data, indent=2, default=str) + "\n")
print(f"added disagg_vs_colocated to {target}")
PYEOF
rm -rf "$cmp_dir"
exit $status
