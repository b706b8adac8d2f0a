#!/usr/bin/env bash
# The GPU steps of a session, in stages that each fit one 10-minute device call.
# On the device machine, from the repository root, after part-ops was staged
# (benchmarks/NOTES-gpu.md, "Runbook"); carry .gpu/vllm/part-py. Results under $OUT.
#
#   bash benchmarks/gpu_session.sh check        # GPU kernel tests at real sizes, no sync (~30 s)
#   bash benchmarks/gpu_session.sh check-engine M # engine test of method M: no JIT under graphs,
#                                               # eager == compiled (adakv ~90 s, others ~4 min)
#                                               # (check-engine balanced: 40 rows decoding
#                                               # through the balanced default, ~3 min)
#   bash benchmarks/gpu_session.sh check-e2e    # engine scenarios on CUDA (~2 min each)
#   bash benchmarks/gpu_session.sh check-fp8    # issue 30: fp8 e2e tests (tests/e2e/test_fp8.py,
#                                               # ~11 eager engines); the engine check on an
#                                               # fp8 cache: check-engine "adakv and fp8"
#   bash benchmarks/gpu_session.sh throughput-B-fp8 # regime B 6000, 8 GiB: vanilla bf16 (+
#                                               # prefill-only), vanilla fp8, Ada-KV 8x/64x on
#                                               # fp8 (~8-9 min)
#   bash benchmarks/gpu_session.sh kernels-fp8  # decode grid under graphs on fp8 caches (~70 s)
#   bash benchmarks/gpu_session.sh kernels      # decode grid + compression overhead
#   bash benchmarks/gpu_session.sh kernels-expected # issue 31: compression overhead, expected
#                                               # scorer vs window scorer (~2 min)
#   bash benchmarks/gpu_session.sh quality NAME ARGS # quality harness, one engine (QMODEL)
#   bash benchmarks/gpu_session.sh kvpress NAME ARGS # kvpress reference on the GPU (QMODEL)
#   bash benchmarks/gpu_session.sh kernels-balance # decode grid under graphs: default vs
#                                               # balanced splits 4/8 x min iters 2/4
#   bash benchmarks/gpu_session.sh kernels-graphs # decode grid under graphs: default and
#                                               # pooled tables, registers (~70 s)
#   bash benchmarks/gpu_session.sh throughput-B [RATIOS] # regime B, 6000 in: vanilla, flag off,
#                                               # 1/8/64; other RATIOS (e.g. 2,4,16): no flag
#                                               # off, file suffixed -2-4-16
#   bash benchmarks/gpu_session.sh throughput-B1000 # regime B, 1000 in, 256 prompts: vanilla, 1/8/16
#   bash benchmarks/gpu_session.sh throughput-A6000 [R] # regime A, 6000 in, 256 prompts:
#                                               # vanilla, prefill-only, ratio R (default 8; ~8 min);
#                                               # another R goes to a file suffixed -R
#   bash benchmarks/gpu_session.sh throughput-A1000 # regime A, 1000 in: vanilla, 1/8/16 (64x: budget < window)
#   bash benchmarks/gpu_session.sh throughput-B-compare # B 6000 8x: vanilla, Ada-KV, GVote (~7 min)
#   bash benchmarks/gpu_session.sh throughput-C8 # C at 8 GiB: 4000 in, 2000 out, 4x/16x (~7 min)
#   bash benchmarks/gpu_session.sh throughput-C  # C, full memory: 1x/4x/16x
#   bash benchmarks/gpu_session.sh throughput-D [BUDGETS] [K] # issue 29, regime D: 32 x 1000 in,
#                                               # 4000 out, 4 GiB: vanilla (+ prefill-only),
#                                               # Ada-KV prompt 512 at decode BUDGETS (default
#                                               # 512,1024; one engine each: ~7-8 min); then
#                                               # `throughput-D 2048` (~5 min); file suffixed
#                                               # -dBUDGETS; K: decode interval (-kK)
#   bash benchmarks/gpu_session.sh decode-event [TREE] # issue 29: one layer-event of 32 D
#                                               # requests (benchmarks/decode_event.py; TREE:
#                                               # another checkout timed first; ~1-2 min)
#   bash benchmarks/gpu_session.sh throughput-B-decode # issue 29: B 6000 8 GiB, 8x (budget
#                                               # 750) at decode budget 0 and 750 (+ vanilla,
#                                               # prefill-only; ~6 min)
#   bash benchmarks/gpu_session.sh throughput-C-decode [R] # issue 29: C 8 GiB, 4000 in, 2000
#                                               # out, ratio R (default 4) at decode budget
#                                               # 4000/R (+ vanilla, prefill-only; ~5-6 min)
#   bash benchmarks/gpu_session.sh serving [R] [FLAGS] # vllm serve + vllm bench serve, 8x,
#                                               # R req/s (default 1; ~8.5 min at 1, ~7.5 at 2);
#                                               # FLAGS for both servers, e.g. "--stream-interval 8"
#   bash benchmarks/gpu_session.sh profile [M]  # profile_steps, staggered, method M (adakv)
#   bash benchmarks/gpu_session.sh compare-trees DIR [R] # B 6000 at R (8) x: Ada-KV from the
#                                               # checkout DIR vs this tree, alternated (~8 min)
#   bash benchmarks/gpu_session.sh prefix-shared [RATIOS] # issue 28: 64 x (5000 shared + 1000
#                                               # own) in, 500 out, 8 GiB: vanilla+PC vs Ada-KV
#                                               # at RATIOS (8) (~4-5 min)
#   bash benchmarks/gpu_session.sh prefix-multiturn [STAGGER] [GIB] # issue 28: 32 conversations
#                                               # x 6 turns re-sending their history, online,
#                                               # vanilla+PC vs Ada-KV 8x (~5-7.5 min)
set -uo pipefail
OUT=${OUT:?set OUT to the results folder}
# shellcheck disable=SC1091
source scripts/gpu-env.sh >/dev/null 2>&1 || { echo "gpu-env failed" >&2; exit 1; }
MODEL=benchmarks/models/llama-3.1-8b

quality_data() {
  # The harness's task data, carried in .gpu/qdata (runbook step 3): essays into the
  # cache, wonderwords on the path (gpu-env.sh sets PYTHONPATH afresh).
  mkdir -p "$HOME/.cache/vllm-adakv/data"
  [ -d "$HOME/.cache/vllm-adakv/data/PaulGrahamEssays" ] \
    || cp -r .gpu/qdata/PaulGrahamEssays "$HOME/.cache/vllm-adakv/data/"
  export PYTHONPATH=$PYTHONPATH:$PWD/.gpu/qdata/pylib
}
case "${1:?stage}" in
  check)
    timeout 300 python3 -m pytest -q tests/gpu/test_cuda_kernels.py 2>&1 | tee "$OUT/check.log" \
      | tail -5
    ;;
  check-engine)
    timeout 560 python3 -m pytest -q -x tests/gpu/test_engine_gpu.py -k "${2:?method}" 2>&1 \
      | tee "$OUT/check-engine-$2.log" | tail -5
    ;;
  check-e2e)
    timeout 560 python3 -m pytest -q tests/e2e/test_engine.py \
      -k "changes_only_long or one_token_last or together" 2>&1 | tee "$OUT/check-e2e.log" \
      | tail -3
    ;;
  check-fp8)
    timeout 580 python3 -m pytest -q -rs tests/e2e/test_fp8.py 2>&1 \
      | tee "$OUT/check-fp8.log" | tail -8
    ;;
  throughput-B-fp8)
    timeout 590 python3 -m benchmarks.throughput --model "$MODEL" --regime B --input-len 6000 \
      --output-len 500 --num-prompts 64 --ratios 8,64 --kv-cache-gib 8 --reserve-output 500 \
      --kv-cache-dtype fp8 --suffix=-fp8 --out "$OUT" 2>&1 | tee "$OUT/B-fp8.log" \
      | grep -v "^{" | tail -20
    ;;
  kernels-fp8)
    timeout 580 python3 -m benchmarks.kernels --graphs --kv-cache-dtype fp8 --suffix=-graphs-fp8 \
      --out "$OUT" "${@:2}" 2>&1 | tee "$OUT/kernels-fp8.log" | grep -v '^{' | tail -45
    ;;
  kernels)
    python3 -m benchmarks.kernels --out "$OUT" 2>&1 | grep -v '^{' | tee "$OUT/kernels.log"
    ;;
  kernels-balance)
    # The log keeps each point's JSON line: a run cut by the timeout still has them.
    timeout 580 python3 -m benchmarks.kernels --graphs --decode-balance 4,8 \
      --decode-balance-min-iters 2,4 --suffix=-graphs-balance --out "$OUT" 2>&1 \
      | tee "$OUT/kernels-balance.log" | grep -v '^{' | tail -45
    ;;
  kernels-graphs)
    # The issue's decode grid under CUDA graphs: the default and the engine's pooled tables
    # (--chunk-tables); registers/spills of each compiled variant (~70 s). Variants to time
    # beside them: extra arguments go to benchmarks.kernels (--decode-launch W:S[:MAXNREG],
    # --decode-balance S, --decode-variants JSON, --decode-grid 'B;C;K').
    timeout 580 python3 -m benchmarks.kernels --graphs --chunk-tables --suffix=-graphs \
      --out "$OUT" "${@:2}" 2>&1 | tee "$OUT/kernels-graphs.log" | grep -v '^{' | tail -45
    ;;
  throughput-B)
    # $2: ratios (default 1,8,64 with the flag-off run); others go to a file suffixed -RATIOS
    ratios=${2:-1,8,64}
    if [ "$ratios" = 1,8,64 ]; then extra=(--flag-off); suffix=""; else
      extra=(); suffix="-${ratios//,/-}"; fi
    timeout 590 python3 -m benchmarks.throughput --model "$MODEL" --regime B --input-len 6000 \
      --output-len 500 --num-prompts 64 --ratios "$ratios" --kv-cache-gib 8 \
      --reserve-output 500 ${extra[@]+"${extra[@]}"} --suffix="$suffix" --out "$OUT" 2>&1 \
      | tee "$OUT/B$suffix.log" | grep -v "^{" | tail -20
    ;;
  throughput-B1000)
    # regime B at 1000 in (issue 8's grid: 256 prompts like A; 32x and 64x: budget < window)
    timeout 590 python3 -m benchmarks.throughput --model "$MODEL" --regime B --input-len 1000 \
      --output-len 500 --num-prompts 256 --ratios 1,8,16 --kv-cache-gib 8 \
      --reserve-output 500 --out "$OUT" 2>&1 | tee "$OUT/B1000.log" | grep -v "^{" | tail -20
    ;;
  throughput-A6000)
    # One ratio per call (the three runs fill it); the log keeps each point's JSON line.
    ratio=${2:-8}
    suffix=$([ "$ratio" = 8 ] || echo "-$ratio")
    timeout 590 python3 -m benchmarks.throughput --model "$MODEL" --regime A --input-len 6000 \
      --output-len 500 --num-prompts 256 --ratios "$ratio" --reserve-output 500 \
      --suffix="$suffix" --out "$OUT" 2>&1 | tee "$OUT/A6000$suffix.log" | grep -v "^{" \
      | tail -20
    ;;
  throughput-A1000)
    python3 -m benchmarks.throughput --model "$MODEL" --regime A --input-len 1000 \
      --output-len 500 --num-prompts 256 --ratios 1,8,16 --reserve-output 500 --out "$OUT" 2>&1 \
      | grep -v "^{" \
      | tee "$OUT/A1000.log" | tail -20
    ;;
  throughput-C)
    timeout 590 python3 -m benchmarks.throughput --model "$MODEL" --regime C --input-len 4000 \
      --output-len 2000 --num-prompts 64 --ratios 1,4,16 --reserve-output 2000 \
      --out "$OUT" 2>&1 | tee "$OUT/C.log" | grep -v "^{" | tail -20
    ;;
  throughput-D)
    # Issue 29, long generation: decode budgets $2 (default 512,1024) in one call, each in
    # an engine of its own (decode_budget is a server setting), against vanilla in the same
    # run. Prompt budget 512 for all (--budgets: the prompt must be compressed for its
    # requests to be decode-compressed; at 1024/2048 the prefill releases nothing). H100
    # estimate: two engines' ~60-80 s starts, vanilla ~100-130 s (32 x 5000 tokens in a
    # 32k-token cache: ~6-11 at once, preemptions), each decode budget ~70 s + ~40-70 s.
    # $3: the decode interval (default: the setting's; the file then gets -kK).
    budgets=${2:-512,1024}
    suffix="-d${budgets//,/-}${3:+-k$3}"
    timeout 590 python3 -m benchmarks.throughput --model "$MODEL" --regime D --input-len 1000 \
      --output-len 4000 --num-prompts 32 --budgets 512 --decode-budgets "$budgets" \
      ${3:+--decode-interval "$3"} \
      --kv-cache-gib 4 --reserve-output 4000 --suffix="$suffix" --out "$OUT" 2>&1 \
      | tee "$OUT/D$suffix.log" | grep -v "^{" | tail -20
    ;;
  decode-event)
    # Issue 29: one layer's decode event of 32 regime-D requests, Ada-KV and SnapKV at
    # decode budgets 512, 1024, 2048 (host and device time, launches, kernels; ~1 min).
    # $2: another tree (e.g. .gpu/before, holding vllm_adakv/ and benchmarks/) timed first
    # with this script, its file suffixed -before.
    if [ -n "${2:-}" ]; then
      cp benchmarks/decode_event.py "$2/benchmarks/"
      (cd "$2" && timeout 150 python3 -m benchmarks.decode_event --suffix=-before \
        --out "$OUT" 2>&1 | tee "$OUT/decode-event-before.log" | grep -v "^{" | tail -6)
    fi
    timeout 200 python3 -m benchmarks.decode_event --out "$OUT" 2>&1 \
      | tee "$OUT/decode-event.log" | grep -v "^{" | tail -6
    ;;
  throughput-B-decode)
    # Issue 29: B 8x (prompt budget 750) without and with decode budget 750 (interval 32),
    # against vanilla in the same run: what compressing the generated tokens adds to B 8x.
    timeout 590 python3 -m benchmarks.throughput --model "$MODEL" --regime B --input-len 6000 \
      --output-len 500 --num-prompts 64 --ratios 8 --decode-budgets 0,750 --kv-cache-gib 8 \
      --reserve-output 500 --suffix=-decode --out "$OUT" 2>&1 | tee "$OUT/B-decode.log" \
      | grep -v "^{" | tail -20
    ;;
  throughput-C-decode)
    # Issue 29: C at 8 GiB (as throughput-C8), ratio $2 (default 4: budget 1000) with the
    # same decode budget; C8's 4x without decode compression ran 1.46x.
    ratio=${2:-4}
    timeout 590 python3 -m benchmarks.throughput --model "$MODEL" --regime C --input-len 4000 \
      --output-len 2000 --num-prompts 64 --ratios "$ratio" --decode-budgets $((4000 / ratio)) \
      --kv-cache-gib 8 --reserve-output 2000 --suffix="-decode-$ratio" --out "$OUT" 2>&1 \
      | tee "$OUT/C-decode-$ratio.log" | grep -v "^{" | tail -20
    ;;
  throughput-B-compare)
    timeout 580 python3 -m benchmarks.throughput --model "$MODEL" --regime B --input-len 6000 \
      --output-len 500 --num-prompts 64 --ratios 8 --kv-cache-gib 8 --reserve-output 500 \
      --method adakv,gvote --suffix=-compare --out "$OUT" 2>&1 | grep -v "^{" \
      | tee "$OUT/B-compare.log" | tail -20
    ;;
  throughput-C8)
    timeout 580 python3 -m benchmarks.throughput --model "$MODEL" --regime C --input-len 4000 \
      --output-len 2000 --num-prompts 64 --ratios 4,16 --kv-cache-gib 8 --reserve-output 2000 \
      --suffix=-8gib --out "$OUT" 2>&1 | grep -v "^{" | tee "$OUT/C8.log" | tail -20
    ;;
  serving)
    # $3: more flags for both servers, e.g. "--stream-interval 8" (suffix -rateR-x)
    timeout 580 python3 -m benchmarks.serving --model "$MODEL" --input-len 6000 --output-len 500 \
      --num-prompts 64 --request-rate "${2:-1}" --ratio 8 --kv-cache-gib 8 --reserve-output 500 \
      --port 0 --step-log --suffix="-rate${2:-1}${3:+-x}" --extra-server-args="${3:-}" \
      --out "$OUT" 2>&1 | tee "$OUT/serving-rate${2:-1}${3:+-x}.log" | grep -v '^{' | tail -20
    ;;
  profile)
    # staggered arrivals (one prompt every 8 steps) in one in-process engine: host waits,
    # sync debug mode, top kernels of the plugin's prompt steps (~4 min on a fresh machine)
    timeout 420 python3 -m benchmarks.profile_steps --model "$MODEL" --method "${2:-adakv}" \
      --stagger 8 --num-prompts 16 --output-len 200 --out "$OUT" 2>&1 \
      | tee "$OUT/profile-${2:-adakv}.log" | grep -v ' pass: ' | tail -60
    ;;
  compare-trees)
    timeout 590 python3 -m benchmarks.compare_trees --model "$MODEL" --before "${2:?dir}" \
      --ratio "${3:-8}" --commit-before "$(cat "$2/COMMIT" 2>/dev/null)" \
      --commit-after "$(cat COMMIT 2>/dev/null)" --out "$OUT" 2>&1 \
      | tee "$OUT/compare-trees.log" | tail -8
    ;;
  prefix-shared)
    # Issue 28, one shared prefix (offline, benchmarks/prefix.py): 64 requests = 5000 shared +
    # 1000 own random tokens, 500 out, all at once, prefix cold at the start; vanilla+PC,
    # then Ada-KV at RATIOS ($2, default 8: budget 750) in one engine. H100, 8B shape,
    # dummy bf16: two engine starts of ~60-110 s; vanilla+PC ran in 20.9 s; Ada-KV 8x
    # ~25-35 s while compressed requests read no cached prefix (each ratio more ~25-35 s):
    # ~4-5 min in all. Results: $OUT/prefix-<gpu>-<date>.json, log $OUT/prefix-shared.log.
    timeout 590 python3 -m benchmarks.prefix shared-prefix --model "$MODEL" --prefix-len 5000 \
      --unique-len 1000 --output-len 500 --num-prompts 64 --ratios "${2:-8}" --kv-cache-gib 8 \
      --reserve-output 500 --out "$OUT" 2>&1 | tee "$OUT/prefix-shared.log" | grep -v '^{'
    ;;
  prefix-multiturn)
    # Issue 28, multi-turn (online, one OpenAI server per method): 32 conversations, one
    # starting every STAGGER s ($2, default 1), 6 turns each: a shared 1000-token system
    # prompt, 800 new user tokens and 200 generated per turn, the whole history re-sent
    # (prompts 1800 ... 6800 tokens); KV GIB ($3, default 8: ~65k tokens of the 8B shape,
    # less than the conversations' histories); vanilla+PC, then Ada-KV with each request's
    # budget = its prompt / 8. H100 estimate: two server starts of ~60-110 s, vanilla+PC
    # ~55-80 s, Ada-KV ~60-100 s while it re-prefills every history (~825k prompt tokens vs
    # ~190k): ~5-7.5 min; each run is cut at 150 s (--deadline; its point says so) so that
    # the call ends in time. Results: $OUT/prefix-<gpu>-<date>.json (a separate call:
    # `python -m benchmarks.prefix merge` joins the two calls' files), log
    # $OUT/prefix-multiturn.log, server logs $OUT/prefix-multi-turn-*.log.gz.
    timeout 590 python3 -m benchmarks.prefix multi-turn --model "$MODEL" --conversations 32 \
      --turns 6 --system-len 1000 --user-len 800 --output-len 200 --stagger "${2:-1}" \
      --ratio 8 --kv-cache-gib "${3:-8}" --reserve-output 200 --step-log --deadline 150 \
      --server-logs "$OUT" --out "$OUT" 2>&1 | tee "$OUT/prefix-multiturn.log" | grep -v '^{'
    ;;
  kernels-expected)
    # Issue 31: one layer's compression with the expected scorer (its query sums included)
    # beside the window scorer's, alone and queued behind the layer's prefill (~2 min).
    timeout 400 python3 -m benchmarks.kernels --compress-only --kv-scorer both \
      --suffix=-expected --out "$OUT" 2>&1 | tee "$OUT/kernels-expected.log" | grep -v '^{'
    ;;
  quality)
    # The quality harness on the GPU, one engine: $2 names the result file
    # ($OUT/quality-<model>-$2.json), the rest are harness arguments. Needs QMODEL (runbook
    # step 3: gpu_prepare.sh build) and the task data.
    name=${2:?name}
    shift 2
    quality_data
    timeout 590 python3 -m benchmarks.quality.run --model "${QMODEL:?run gpu_prepare first}" \
      --device cuda --one-engine --samples 6 "$@" \
      --out "$OUT/quality-$(basename "$QMODEL")-$name.json" --log "$OUT/quality-$name.log" \
      2>&1 | grep -v "^INFO\|^WARNING" | tail -15
    ;;
  kvpress)
    # kvpress reference on the GPU (bf16): its wheels (carry .gpu/kvpress: kvpress 0.5.5,
    # transformers 5.2.0 and tokenizers 0.22.2 ahead of the image's, datasets/dill/
    # multiprocess/fire for its imports) go to a target folder of their own; $2 names the
    # result file, the rest are kvpress_reference arguments. Needs QMODEL and the task data.
    name=${2:?name}
    shift 2
    quality_data
    site=$HOME/.kvpress-site
    [ -d "$site/kvpress" ] || python3 -m pip install -q --no-index --no-deps --target "$site" \
      .gpu/kvpress/wheels/*.whl
    PYTHONPATH=$site:$PYTHONPATH timeout 590 python3 -m benchmarks.quality.kvpress_reference \
      --model "${QMODEL:?run gpu_prepare first}" --device cuda --dtype bfloat16 "$@" \
      --out "$OUT/quality-$(basename "$QMODEL")-kvpress-$name.json" 2>&1 \
      | tee "$OUT/kvpress-$name.log" | grep -v "agnostic: " | tail -15
    ;;
  *) echo "unknown stage $1" >&2; exit 2 ;;
esac
