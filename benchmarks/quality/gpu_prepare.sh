#!/usr/bin/env bash
# Rebuild and convert a model on a GPU host without network (python 3.12, transformers 5.x).
#
# The parts come from `python -m benchmarks.quality.split_model` (default .gpu/qwen/) and
# travel over consecutive warm device calls (<= 64 MiB each), e.g. call k carries
# .gpu/qwen/<name>.part00k (+ MANIFEST and wheels/ with the first one) and runs
#     bash benchmarks/quality/gpu_prepare.sh stash
# which moves every part that arrived into $VLLM_ADAKV_CACHE/parts/ (outside the tree).
# The last call runs
#     MODEL=$(bash benchmarks/quality/gpu_prepare.sh build | tail -1)
# which checks every part's sha256 against MANIFEST, concatenates them, installs the
# carried wheels (gguf, pure Python) into $VLLM_ADAKV_CACHE/pylib, and converts:
#   kind file (a GGUF): the GGUF becomes $VLLM_ADAKV_CACHE/downloads/<name>, then
#     prepare_model --model $PREPARE_MODEL (default qwen2.5-coder-0.5b) --no-download
#     checks its pinned sha256 and writes the HF folder (bf16) under $VLLM_ADAKV_CACHE/models;
#   kind dir (a tar of a prepared folder): extracted under $VLLM_ADAKV_CACHE/models.
# The last stdout line is the model folder. `status` lists what has arrived.
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC=${PARTS_DIR:-.gpu/qwen}
CACHE=${VLLM_ADAKV_CACHE:-$HOME/.cache/vllm-adakv}
export VLLM_ADAKV_CACHE=$CACHE
STASH=$CACHE/parts
PY=${PYTHON:-python3}
mkdir -p "$STASH"

stash() {
  shopt -s nullglob
  for f in "$SRC"/*.part[0-9][0-9][0-9]; do mv -f "$f" "$STASH/"; done
  if [ -f "$SRC/MANIFEST" ]; then mv -f "$SRC/MANIFEST" "$STASH/"; fi
  if [ -d "$SRC/wheels" ]; then mkdir -p "$STASH/wheels"; mv -f "$SRC"/wheels/* "$STASH/wheels/" 2>/dev/null || true; fi
  status
}

status() {
  [ -f "$STASH/MANIFEST" ] || { echo "no MANIFEST yet in $STASH" >&2; return 0; }
  local want have=0 total=0
  while read -r tag sum name; do
    [ "$tag" = part ] || continue
    total=$((total + 1))
    [ -f "$STASH/$name" ] && have=$((have + 1))
  done < "$STASH/MANIFEST"
  echo "parts: $have of $total in $STASH" >&2
}

build() {
  stash
  local kind name whole
  kind=$(awk '$1=="kind"{print $2}' "$STASH/MANIFEST")
  name=$(awk '$1=="name"{print $2}' "$STASH/MANIFEST")
  whole=$(awk '$1=="sha256"{print $2}' "$STASH/MANIFEST")
  (cd "$STASH" && awk '$1=="part"{print $2"  "$3}' MANIFEST | sha256sum -c --quiet -) \
    || { echo "gpu_prepare: a part is missing or corrupt" >&2; exit 3; }
  local joined=$STASH/$name.joined
  awk '$1=="part"{print $3}' "$STASH/MANIFEST" | (cd "$STASH" && xargs cat) > "$joined"
  echo "$whole  $joined" | sha256sum -c --quiet - || { echo "gpu_prepare: bad join" >&2; exit 3; }
  if [ "$kind" = dir ]; then
    mkdir -p "$CACHE/models"
    tar -C "$CACHE/models" -xf "$joined"
    rm -f "$joined"
    echo "$CACHE/models/$name"
    return
  fi
  mkdir -p "$CACHE/downloads" "$CACHE/pylib"
  mv -f "$joined" "$CACHE/downloads/$name"
  if ! "$PY" -c "import gguf" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target "$CACHE/pylib" "$STASH"/wheels/*.whl
    export PYTHONPATH="$CACHE/pylib${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PY" -m adakv_devtools.prepare_model --model "${PREPARE_MODEL:-qwen2.5-coder-0.5b}" \
    --no-download --dtype "${DTYPE:-bfloat16}" | tail -1
}

case "${1:-status}" in
  stash) stash ;;
  build) build ;;
  status) status ;;
  *) echo "usage: $0 stash|build|status" >&2; exit 2 ;;
esac
