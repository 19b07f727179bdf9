#!/usr/bin/env bash
# The second H200 call (issue 14), once first_run.sh came back green: the measurements that
# take minutes. Stages:
#   env           as in first_run.sh (a fresh machine each call)
#   build         again from source, sm_90a only (the machine starts bare)
#   bench_grid    bench_kernels.py: the full grid of every op against torch (SDPA backends,
#                 gathered decode, index_copy, contiguous copy) and the measured ceilings
#   transfer      bench_transfer.py: cuda_ipc pulls between two processes vs a D2D copy;
#                 its rows join gpu_kernels.json as "kv_transfer"
#   serving       drt-run bench: 1 prefill + 1 decode process sharing the GPU (cuda_ipc
#                 pulls) vs colocated, dummy:llama-tiny in bf16, random 512/128 tokens
# Same discipline as first_run.sh (stages.sh): budget DRT_GPU_BUDGET_S (default 540 s),
# each stage under its own cap cut to what is left, the 8 files always in $OUT:
#   summary.txt                  stage table + environment report: read first
#   build.log                    cmake configure + build (ptxas -v lines)
#   bench_grid.log               bench_kernels.py's tables
#   gpu_kernels.json             its results, plus "kv_transfer" (or why there are none)
#   gpu_kernels.png              % of the measured ceiling per case (when the grid finished)
#   transfer.log                 bench_transfer.py's table
#   serving.log                  drt-run bench's comparison table
#   disagg_vs_colocated_gpu.json drt-run bench --save-result of the comparison
#
# Usage: bash bench/gpu/second_run.sh [--dry-run] [--quick]
#   --quick: one small case per op, one request rate, 50 requests (a smoke run).
set -uo pipefail
SCRIPT=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
# shellcheck source=stages.sh
. "$(dirname "$SCRIPT")/stages.sh"
RUN_NAME=second_run.sh
STAGES=(env build bench_grid transfer serving)
FILES=(summary.txt build.log bench_grid.log gpu_kernels.json gpu_kernels.png transfer.log
       serving.log disagg_vs_colocated_gpu.json)

quick_flag() { [ "${DRT_GPU_QUICK:-0}" = 1 ] && echo --quick; }

stage_bench_grid() {
  # Straight into OUT: the JSON and the PNG both come back.
  "${PYFLAGS[@]}" bench/gpu/bench_kernels.py --out "$OUT" $(quick_flag)
}

stage_transfer() {
  # Adds "kv_transfer" to OUT/gpu_kernels.json (it exists: the run creates every file).
  "${PYFLAGS[@]}" bench/gpu/bench_transfer.py --out "$OUT" $(quick_flag)
}

stage_serving() {
  local dir rc rates=(20 80) num_prompts=200
  if [ "${DRT_GPU_QUICK:-0}" = 1 ]; then rates=(20); num_prompts=50; fi
  # The per-run JSONs stay in a temporary folder: only the comparison comes back.
  dir=$(mktemp -d)
  "${PYFLAGS[@]}" -m distserve_rt.entrypoints.cli bench --device cuda --dtype bfloat16 \
    --share-gpus --gpu-memory-utilization 0.3 --compare disaggregated colocated \
    --dataset-name random --random-input-len 512 --random-output-len 128 \
    --num-prompts "$num_prompts" --request-rate "${rates[@]}" --max-model-len 1024 \
    --max-num-seqs 64 --slo-ttft-ms 100 --slo-tpot-ms 20 --disable-tqdm --save-result \
    --result-dir "$dir" --result-filename disagg_vs_colocated_gpu.json
  rc=$?
  if [ -f "$dir/disagg_vs_colocated_gpu.json" ]; then
    cp "$dir/disagg_vs_colocated_gpu.json" "$OUT/"
  fi
  rm -rf "$dir"
  return $rc
}

if [ "${1:-}" = --stage ]; then  # one stage, run by `stage` in a fresh bash under timeout
  python_launchers
  "stage_$2"
  exit $?
fi

args=()
for arg in "$@"; do
  case $arg in
    --quick) export DRT_GPU_QUICK=1 ;;
    --dry-run) args+=(--dry-run) ;;
    *) echo "second_run.sh: unknown argument '$arg'; allowed: --dry-run, --quick" >&2; exit 2 ;;
  esac
done
gpu_setup "${args[@]}"
for f in "${FILES[@]}"; do [ -e "$OUT/$f" ] || : >"$OUT/$f"; done
for f in gpu_kernels.json disagg_vs_colocated_gpu.json; do
  [ -s "$OUT/$f" ] || echo '{"status": "not produced: see summary.txt"}' >"$OUT/$f"
done
echo "second_run.sh: budget ${DRT_GPU_BUDGET_S}s, OUT=$OUT, dry run: $DRT_GPU_DRY_RUN, quick: ${DRT_GPU_QUICK:-0}"

stage env 20 summary.txt
stage build 240 build.log
stage bench_grid 200 bench_grid.log build
stage transfer 90 transfer.log build
stage serving 240 serving.log build

finish_summary
echo
cat "$OUT/summary.txt"
dry_run_report || exit 1
all_passed
