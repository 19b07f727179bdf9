# Stage runner of bench/gpu/first_run.sh and second_run.sh (sourced, not run).
#
# The device tool gives 15 minutes in all, at most 10 per command, and brings back only
# what is in $OUT (8 files). So a run script is a list of stages, each run by `stage` under
# its own cap cut to what is left of the budget; whatever happens (a failure, a cut, the
# script killed), summary.txt in $OUT says which stages ran, passed, failed or were cut,
# with their durations: it is rewritten after every stage, so even a SIGKILL leaves it
# current, and the stages never started are listed as such.
#
# Environment:
#   OUT               where the files go (the device tool's folder); default
#                     bench/results/gpu, or a fresh temporary folder in a dry run
#   DRT_GPU_BUDGET_S  the whole run's wall-clock budget in seconds (default 540: the
#                     device tool's 600 s per command, less a minute of margin)
#   DRT_GPU_DRY_RUN=1 (or --dry-run): stubs for nvidia-smi, nvcc, cmake, cuobjdump and
#                     compute-sanitizer first on PATH (they record their argv and print
#                     plausible output), pytest only collects, the benchmark scripts only
#                     parse their flags, every_op.py runs on CPU, and the server packages
#                     are hidden as on the GPU machine: every path and flag is checked here.
#   DRT_GPU_STUB_DIR  the dry run's stubs (default bench/gpu/stubs; tests swap one)
#   PYTHON            the interpreter (default python3)

# Each stage body is a function `stage_<name>` of the calling script, run in a fresh bash
# (`bash SCRIPT --stage NAME`) under `timeout`, which signals the whole process group:
# a cut pytest takes its spawned engine processes with it.

# Seconds kept back for writing the summary after the last stage, and the least a stage
# is started with (it is skipped below that); tests shrink both to cut stages quickly.
STAGE_RESERVE_S=${DRT_GPU_STAGE_RESERVE_S:-8}
STAGE_MIN_S=${DRT_GPU_STAGE_MIN_S:-5}

gpu_setup() {
  ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  cd "$ROOT" || exit 1
  export ROOT PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
  export PY=${PYTHON:-python3}
  if [ "${1:-}" = "--dry-run" ]; then export DRT_GPU_DRY_RUN=1; fi
  export DRT_GPU_DRY_RUN=${DRT_GPU_DRY_RUN:-0}
  if [ "$DRT_GPU_DRY_RUN" = 1 ]; then
    export OUT=${OUT:-$(mktemp -d /tmp/drt_gpu_dry.XXXXXX)}
    export STUB_LOG=${STUB_LOG:-$(mktemp /tmp/drt_gpu_stub_calls.XXXXXX)}
    export PATH="${DRT_GPU_STUB_DIR:-$ROOT/bench/gpu/stubs}:$PATH"
  else
    export OUT=${OUT:-$ROOT/bench/results/gpu}
  fi
  case ${DRT_GPU_BUDGET_S:=540} in
    '' | *[!0-9]*) echo "DRT_GPU_BUDGET_S=$DRT_GPU_BUDGET_S: must be whole seconds, e.g. 540" >&2
                   exit 2 ;;
  esac
  export DRT_GPU_BUDGET_S
  mkdir -p "$OUT"
  # The env stage's report lands in summary.txt: a ninth file would not come back.
  export ENV_REPORT=${ENV_REPORT:-$(mktemp /tmp/drt_gpu_env.XXXXXX)}
  T0=$(date +%s)
  STAGE_ROWS=()
  CURRENT_STAGE=""
  declare -gA STAGE_STATUS=()
  trap 'stage_killed' TERM INT HUP
  SUMMARY_DONE=0
  trap '[ "$SUMMARY_DONE" = 1 ] || write_summary "stopped early"' EXIT
}

# Python launchers for the stages, dry run or not (arrays: paths may hold spaces).
#   PYTEST: pytest;  PYFLAGS: a script or `-m module` that a dry run only parses flags of.
python_launchers() {
  if [ "$DRT_GPU_DRY_RUN" = 1 ]; then
    PYTEST=("$PY" bench/gpu/no_server_deps.py -m pytest --collect-only)
    PYFLAGS=("$PY" bench/gpu/no_server_deps.py --flags-only)
    PYRUN=("$PY" bench/gpu/no_server_deps.py)
    OP_DEVICE=cpu
  else
    PYTEST=("$PY" -m pytest)
    PYFLAGS=("$PY")
    PYRUN=("$PY")
    OP_DEVICE=cuda
  fi
}

seconds_left() { echo $((DRT_GPU_BUDGET_S - ($(date +%s) - T0))); }

# stage NAME CAP_S LOG [NEEDS]: runs stage_NAME for at most CAP_S seconds (less if the budget
# has less left), its output appended to $OUT/LOG. NEEDS: a stage that must have passed.
stage() {
  local name=$1 cap=$2 log=$3 needs=${4:-}
  local left limit start rc status
  if [ -n "$needs" ] && [ "${STAGE_STATUS[$needs]:-}" != ok ]; then
    record "$name" "SKIPPED ($needs did not pass)" 0 "$cap" "$log"
    return
  fi
  left=$(($(seconds_left) - STAGE_RESERVE_S))
  limit=$((cap < left ? cap : left))
  if [ "$limit" -lt "$STAGE_MIN_S" ]; then
    record "$name" "SKIPPED (budget spent: ${left}s left)" 0 "$cap" "$log"
    return
  fi
  CURRENT_STAGE="$name $log $limit $(date +%s)"
  write_summary running
  echo "== $name (limit ${limit}s) -> $log"
  # summary.txt is rewritten after every stage: what the env stage prints goes to the
  # report that write_summary appends to it.
  local file="$OUT/$log"
  [ "$log" = summary.txt ] && file=$ENV_REPORT
  { echo; echo "===== stage $name: limit ${limit}s (cap ${cap}s), $(date -u +%H:%M:%S) UTC"; } >>"$file"
  start=$(date +%s)
  # In the background: bash runs a trap only once the foreground command ends, and `wait`
  # returns at once on a signal, so a stopped run records the stage it stopped.
  timeout -k 5 "$limit" bash "$SCRIPT" --stage "$name" >>"$file" 2>&1 &
  STAGE_PID=$!
  wait "$STAGE_PID"
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="CUT (at its ${limit}s limit)" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  CURRENT_STAGE=""
  record "$name" "$status" $(($(date +%s) - start)) "$limit" "$log"
  tail -n 4 "$file" | sed 's/^/   | /'
}

record() {
  STAGE_STATUS[$1]=${2%% *}
  STAGE_ROWS+=("$(printf '%-16s %-40s %6s %8s  %s' "$1" "$2" "$3" "$4" "$5")")
  write_summary running
}

stage_killed() {
  # timeout passes the signal on to the stage's whole process group.
  [ -n "${STAGE_PID:-}" ] && kill -TERM "$STAGE_PID" 2>/dev/null
  if [ -n "$CURRENT_STAGE" ]; then
    read -r name log limit start <<<"$CURRENT_STAGE"
    CURRENT_STAGE=""
    record "$name" "KILLED (the run was stopped)" $(($(date +%s) - start)) "$limit" "$log"
  fi
  exit 143
}

# summary.txt: the stage table first (what a reader needs), then the stages not reached,
# then the environment report when the env stage wrote one.
write_summary() {
  local file="$OUT/summary.txt" name
  {
    echo "$RUN_NAME: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "budget ${DRT_GPU_BUDGET_S}s, used $(($(date +%s) - T0))s; dry run: $([ "$DRT_GPU_DRY_RUN" = 1 ] && echo yes || echo no); state: $1"
    echo
    printf '%-16s %-40s %6s %8s  %s\n' stage status secs limit_s log
    printf '%s\n' "${STAGE_ROWS[@]}"
    if [ -n "$CURRENT_STAGE" ]; then
      read -r name _ <<<"$CURRENT_STAGE"
      printf '%-16s %s\n' "$name" "RUNNING (or killed while running)"
    fi
    for name in "${STAGES[@]}"; do
      if [ -z "${STAGE_STATUS[$name]:-}" ] && [[ "$CURRENT_STAGE" != "$name "* ]]; then
        printf '%-16s %s\n' "$name" "not reached"
      fi
    done
    echo
    echo "files in OUT: $(cd "$OUT" && ls -I '*.tmp' | tr '\n' ' ')"
    if [ -s "$ENV_REPORT" ]; then
      echo
      cat "$ENV_REPORT"
    fi
  } >"$file.tmp" && mv "$file.tmp" "$file"
}

finish_summary() {
  write_summary done
  SUMMARY_DONE=1
}

# The script's exit status: 0 only when every stage passed.
all_passed() {
  local name
  for name in "${STAGES[@]}"; do
    [ "${STAGE_STATUS[$name]:-}" = ok ] || return 1
  done
}

# In a dry run: what the stubs were asked to do, and what came back in $OUT (at most 8).
dry_run_report() {
  [ "$DRT_GPU_DRY_RUN" = 1 ] || return 0
  echo
  echo "== dry run: stub calls (argv)"
  sed "s#$ROOT#<repo>#g; s#$OUT#<OUT>#g" "$STUB_LOG"
  echo "== dry run: files in OUT"
  (cd "$OUT" && for f in *; do printf '%8s  %s\n' "$(wc -c <"$f")" "$f"; done)
  local count
  count=$(find "$OUT" -maxdepth 1 -type f ! -name '.*' | wc -l)
  if [ "$count" -gt 8 ]; then
    echo "DRY RUN: $count files in OUT; the device tool brings back 8" >&2
    return 1
  fi
}

# ---- the stages both runs start with (a fresh machine each call) -------------------------

stage_env() {
  {
    echo "== environment"
    echo "host $(uname -n), $(nproc) CPUs, $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB RAM"}')"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit \
      --format=csv,noheader 2>&1 || echo "nvidia-smi failed"
    nvcc --version 2>&1 | tail -1 || echo "nvcc not found"
    "$PY" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB")
else:
    print("torch sees no CUDA device")
EOF
    "$PY" -m pip list --format=freeze 2>/dev/null |
      grep -iE '^(torch|triton|cupy|numpy|pybind11|cmake|ninja|pytest|hypothesis|nvidia-cu)' |
      tr '\n' ' '
    echo
    for tool in compute-sanitizer cuobjdump c++filt; do
      echo "$tool: $(command -v $tool || find_cuda_tool $tool || echo 'not found')"
    done
  }
}

# A CUDA tool off PATH: the toolkit folder beside nvcc, else /usr/local/cuda/bin.
find_cuda_tool() {
  local dir
  for dir in "$(dirname "$(command -v nvcc 2>/dev/null || echo /nonexistent/nvcc)")" \
             /usr/local/cuda/bin; do
    [ -x "$dir/$1" ] && { echo "$dir/$1"; return 0; }
  done
  return 1
}

stage_build() {
  local bin cmake ninja
  bin=$(dirname "$(command -v "$PY")")
  cmake=$(command -v cmake || echo "$bin/cmake")
  ninja=$(command -v ninja || echo "$bin/ninja")
  "$cmake" -S . -B build/gpu -G Ninja -DDRT_CUDA=ON -DDRT_CUDA_ARCHS=90a \
    -DCMAKE_MAKE_PROGRAM="$ninja" -DPython_EXECUTABLE="$(command -v "$PY")" \
    "-DCMAKE_CUDA_FLAGS=-Xptxas -v" &&
    "$cmake" --build build/gpu -j "$(nproc)" &&
    "$PY" -c "import distserve_rt._cuda as m, distserve_rt._C as c; print('built', m.__file__, c.__file__)"
}
