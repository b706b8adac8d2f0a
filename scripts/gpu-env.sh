# Source on the device machine (GPU host without vLLM), from the repository root:
#   source scripts/gpu-env.sh
# Needs the offline vLLM bundle (../shared/tools/gpu-vllm/build.sh .gpu/vllm; part-ops staged
# in an earlier call) carried with the call, and .gpu/wheels (optional extra wheels). Registers this
# package's vLLM plugin entry point without building it (the repository is on PYTHONPATH).
H=${VLLM_BUNDLE_HOME:-$HOME/.vllm-bundle}
if [ ! -d "$H/site/vllm" ]; then
  # shellcheck disable=SC1091
  source .gpu/vllm/part-py/install.sh || return 1
  if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target "$H/site" .gpu/wheels/*.whl
  fi
  D="$H/site/vllm_adakv-0.1.0.dist-info"
  mkdir -p "$D"
  printf 'Metadata-Version: 2.1\nName: vllm-adakv\nVersion: 0.1.0\n' > "$D/METADATA"
  printf '[vllm.general_plugins]\nadakv = vllm_adakv.plugin:register\n' > "$D/entry_points.txt"
fi
export PYTHONPATH="$PWD:$H/site" PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0
export TRITON_INTERPRET=0
