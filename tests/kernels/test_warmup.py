"""The start-up warm-up launches every compressed-path kernel without error (interpreter).

That it leaves nothing to compile during inference is checked on a GPU, where vLLM's
JIT monitor runs in error mode (tests/gpu/test_engine_gpu.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from vllm_adakv.kernels.warmup import warm_up  # noqa: E402


@pytest.mark.parametrize("q_heads,kv_heads,dim", [(8, 2, 64)])
def test_warm_up_runs_every_kernel(q_heads, kv_heads, dim):
    seconds = warm_up(torch.device("cpu"), torch.float32, q_heads, kv_heads, dim, 16,
                      window=8, gqa_reduce="mean", pooling="max", pool_kernel=7, alpha=0.2,
                      gvote_samples=3)
    assert seconds >= 0.0
