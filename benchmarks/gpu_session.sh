#!/usr/bin/env bash
# The GPU steps of a session, in stages that each fit one 10-minute device call.
# On the device machine, from the repository root, after part-ops was staged
# (benchmarks/NOTES-gpu.md, "Runbook"); carry .gpu/vllm/part-py. Results under $OUT.
#
#   bash benchmarks/gpu_session.sh check        # GPU tests: kernels, no sync, engine (no JIT)
#   bash benchmarks/gpu_session.sh check-e2e    # engine scenarios on CUDA (~2 min each)
#   bash benchmarks/gpu_session.sh kernels      # decode grid + compression overhead
#   bash benchmarks/gpu_session.sh throughput-B # regime B, 6000 in: vanilla, flag off, 1/8/64
#   bash benchmarks/gpu_session.sh throughput-A6000 # regime A, 6000 in, 256 prompts: vanilla, 8x (~8 min)
#   bash benchmarks/gpu_session.sh throughput-A1000
set -uo pipefail
OUT=${OUT:?set OUT to the results folder}
# shellcheck disable=SC1091
source scripts/gpu-env.sh >/dev/null 2>&1 || { echo "gpu-env failed" >&2; exit 1; }
MODEL=benchmarks/models/llama-3.1-8b
case "${1:?stage}" in
  check)
    python3 -m pytest -q tests/gpu 2>&1 | tee "$OUT/check.log" | tail -5
    ;;
  check-e2e)
    timeout 560 python3 -m pytest -q tests/e2e/test_engine.py \
      -k "changes_only_long or one_token_last or together" 2>&1 | tee "$OUT/check-e2e.log" \
      | tail -3
    ;;
  kernels)
    python3 -m benchmarks.kernels --out "$OUT" 2>&1 | grep -v '^{' | tee "$OUT/kernels.log"
    ;;
  throughput-B)
    python3 -m benchmarks.throughput --model "$MODEL" --regime B --input-len 6000 \
      --output-len 500 --num-prompts 64 --ratios 1,8,64 --kv-cache-gib 8 \
      --reserve-output 500 --flag-off --out "$OUT" 2>&1 | grep -v "^{" | tee "$OUT/B.log" \
      | tail -20
    ;;
  throughput-A6000)
    python3 -m benchmarks.throughput --model "$MODEL" --regime A --input-len 6000 \
      --output-len 500 --num-prompts 256 --ratios 8 --reserve-output 500 --out "$OUT" 2>&1 \
      | grep -v "^{" | tee "$OUT/A6000.log" | tail -20
    ;;
  throughput-A1000)
    python3 -m benchmarks.throughput --model "$MODEL" --regime A --input-len 1000 \
      --output-len 500 --num-prompts 256 --ratios 8,16 --out "$OUT" 2>&1 | grep -v "^{" \
      | tee "$OUT/A1000.log" | tail -20
    ;;
  *) echo "unknown stage $1" >&2; exit 2 ;;
esac
