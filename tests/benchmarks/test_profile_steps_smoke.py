"""``benchmarks/profile_steps.py --stagger`` end to end on the CPU (tiny model, Ada-KV).

Prompts arrive one every 3 engine steps while the earlier ones decode: each step with
prompt tokens is listed with its decoding rows, which must grow as requests accumulate.
About 40 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from adakv_devtools.tiny_model import make_tiny_llama  # noqa: E402

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
NUM_PROMPTS = 4


def test_staggered_passes_list_prompt_steps_next_to_decoding_rows(tmp_path: Path) -> None:
    model = make_tiny_llama(tmp_path / "tiny")
    out = tmp_path / "results"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_steps", "--model", str(model),
         "--num-prompts", str(NUM_PROMPTS), "--input-len", "256", "--output-len", "12",
         "--ratio", "4", "--stagger", "3", "--out", str(out), "--extra-engine-args",
         json.dumps({"dtype": "float32", "block_size": 32, "enforce_eager": True})],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert proc.stdout.count(" pass: ") == 3  # each pass printed as it finished
    (path,) = out.glob("profile-steps-adakv-cpu-*-stagger3.json")
    result = json.loads(path.read_text())
    for name in ("first_pass", "second_pass", "profiled_pass"):
        p = result[name]
        assert p["mixed_steps"] == NUM_PROMPTS == len(p["mixed"])
        assert [m[0] for m in p["mixed"]] == [256] * NUM_PROMPTS  # one whole prompt each
        rows = [m[1] for m in p["mixed"]]
        assert rows[0] == 0 and rows == sorted(rows) and rows[-1] >= 2, rows
        assert all(m[2] > 0 for m in p["mixed"])
        assert p["decode_steps"] > 0 and p["wall_s"] > 0
    profiled = result["profiled_pass"]
    assert profiled["host_top_ops"] and all(o["self_cpu_ms"] >= 0 for o in profiled["host_top_ops"])
    assert isinstance(profiled["host_waits"], list)  # no CUDA runtime calls on the CPU


def test_host_waits_are_grouped_by_call_and_innermost_project_frame() -> None:
    from types import SimpleNamespace as Event

    from benchmarks.profile_steps import host_waits

    site = "/x/site-packages/vllm_adakv/attention/compressor.py(88): run"
    events = [
        Event(name="cudaStreamSynchronize", cpu_time_total=300.0,
              stack=["torch/cuda/__init__.py(1): synchronize", site, "/x/vllm/v1/a.py(1): f"]),
        Event(name="cudaStreamSynchronize", cpu_time_total=100.0, stack=[],
              cpu_parent=Event(name="aten::index", stack=[site], cpu_parent=None)),
        Event(name="cudaMemcpyAsync", cpu_time_total=5.0, stack=[]),
        Event(name="cudaLaunchKernel", cpu_time_total=900.0, stack=[site]),  # never waits
    ]
    waits = host_waits(events)
    assert waits == [
        {"call": "cudaStreamSynchronize", "site": "vllm_adakv/attention/compressor.py(88): run",
         "count": 2, "total_ms": 0.4, "max_ms": 0.3},
        {"call": "cudaMemcpyAsync", "site": "?", "count": 1, "total_ms": 0.005, "max_ms": 0.005}]
