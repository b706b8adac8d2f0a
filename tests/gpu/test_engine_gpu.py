"""The CUDA backend in a real engine: nothing is compiled during inference.

Skipped without CUDA. vLLM's JIT monitor in error mode raises in the worker if any
Triton kernel compiles after the engine's warm-up; requests of many lengths arrive
over several steps (mixed steps with 1..N head-wise decode rows, hence several
split counts; prompts whose length is and is not a multiple of 16; block-table
rows at both alignments) under torch.compile and CUDA graphs.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from tests.e2e.conftest import run_scenario  # noqa: E402
from vllm_adakv.tools.tiny_model import make_tiny_llama  # noqa: E402


def test_no_kernel_compiles_during_inference(tmp_path):
    model = make_tiny_llama(tmp_path, random_weights=True)
    lengths = [300, 512, 777, 1024, 333, 640, 901, 256, 480, 1200, 700, 415]
    requests = [{"len": n, "seed": i, "max_tokens": 24} for i, n in enumerate(lengths)]
    arrivals = {str(2 * i): [i] for i in range(len(requests))}
    spec = {"model_dir": str(model), "requests": requests, "arrive_at_step": arrivals,
            "compression": {"method": "adakv", "budget": 128, "window": 16},
            "engine": {"enforce_eager": False, "jit_monitor_mode": "error",
                       "dtype": "bfloat16"}}
    res = run_scenario(spec)
    assert len(res["outputs"]) == len(requests)
    assert res["released_blocks"] > 0
