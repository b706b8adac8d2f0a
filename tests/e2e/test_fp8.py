"""End to end with an fp8 KV cache (``kv_cache_dtype="fp8"``, issue 30).

On the CPU compression refuses an fp8 cache at start-up with an error naming the flag:
vLLM's CPU fp8 cache needs AVX-512 or AMX (``cpu_attn._get_attn_isa``) and packs keys per
ISA, and no machine here runs it. On CUDA (the same scenarios on a CUDA build of vLLM,
``conftest.run_scenario``) compression runs on TRITON_ATTN's fp8 cache: these tests are
skipped without a GPU and have not run on one yet. What runs everywhere: the worker's whole
step on an fp8 cache equals the step on its dequantized values
(``tests/worker/test_compressor.py``), the CUDA backend's views, scales and queries
(``tests/worker/test_fp8_wiring.py``), the kernels (``tests/kernels``).
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import WITHOUT_PLUGIN, _cuda, run_scenario
from vllm_adakv.config import KVCompressionConfig
from vllm_adakv.memory import plan_compression
from vllm_adakv.methods import REGISTRY

pytestmark = pytest.mark.e2e

FP8 = {"kv_cache_dtype": "fp8"}
ADAKV = {"method": "adakv", "budget": 128, "window": 16}
cuda_only = pytest.mark.skipif(not _cuda(), reason="fp8 KV caches are compressed on CUDA only")


@pytest.mark.skipif(_cuda(), reason="the CPU's refusal")
def test_fp8_cache_with_compression_is_a_start_up_error_on_cpu(small_model):
    spec = {"model_dir": str(small_model), "requests": [{"len": 100, "max_tokens": 4}],
            "compression": ADAKV, "engine": FP8}
    stderr: list[str] = []
    with pytest.raises(AssertionError, match="scenario failed"):
        run_scenario(spec, stderr=stderr)
    assert ("--kv-cache-dtype fp8 is not supported with --kv-compression on the CPU"
            in stderr[0])
    assert "use --kv-cache-dtype auto" in stderr[0]


@cuda_only
def test_fp8_budget_at_least_prompt_reproduces_vanilla_fp8(small_model):
    """Budget >= prompt: token for token what vLLM without the plugin gives on the same
    fp8 cache."""
    requests = [{"len": n, "seed": i, "max_tokens": 24} for i, n in enumerate([90, 300, 500])]
    base = {"model_dir": str(small_model), "requests": requests, "engine": FP8}
    vanilla = run_scenario({**base, "compression": None}, env=WITHOUT_PLUGIN)
    for method in [n for n, m in REGISTRY.items() if m.compresses and not m.measured]:
        same = run_scenario({**base, "compression": {"method": method, "budget": 512}})
        assert same["manager"] == "CompressedKVManager"
        assert same["released_blocks"] == 0
        assert same["outputs"] == vanilla["outputs"], method


@cuda_only
def test_fp8_e5m2_is_a_start_up_error_naming_the_flag(small_model):
    """vLLM 0.32 stops an fp8_e5m2 engine on TRITON_ATTN (an assert in its attention layer,
    seen on an H100 without the plugin too): compression refuses it at start-up."""
    spec = {"model_dir": str(small_model), "requests": [{"len": 100, "max_tokens": 4}],
            "compression": ADAKV, "engine": {"kv_cache_dtype": "fp8_e5m2"}}
    stderr: list[str] = []
    with pytest.raises(AssertionError, match="scenario failed"):
        run_scenario(spec, stderr=stderr)
    assert "--kv-cache-dtype fp8_e5m2 is not supported with --kv-compression" in stderr[0]


@cuda_only
@pytest.mark.parametrize("section", [ADAKV, {**ADAKV, "method": "pyramidkv"},
                                     {**ADAKV, "method": "streamingllm"},
                                     {"method": "gvote", "window": 16, "max_budget": 128}],
                         ids=lambda s: s["method"])
def test_fp8_compressed_run_releases_and_frees_everything(fat_kv_model, section):
    """Compressed on an fp8 cache: every request completes, the plans' blocks are released
    after the prefill, and every block is free at the end."""
    requests = [{"len": n, "seed": i, "max_tokens": 16} for i, n in enumerate([1000, 700, 90])]
    res = run_scenario({"model_dir": str(fat_kv_model), "requests": requests,
                        "compression": section, "engine": FP8})
    assert sorted(res["outputs"]) == ["0", "1", "2"]
    assert all(len(out) == 16 for out in res["outputs"].values())
    assert res["free_end"] == res["free_start"]
    if section["method"] == "gvote":  # measured: the cap's release, then the reports'
        assert res["released_blocks"] > 0
        return
    cfg = KVCompressionConfig(**section)
    plans = [plan_compression(cfg, n, num_kv_heads=16, block_size=32, num_layers=4)
             for n in (1000, 700)]
    assert res["released_blocks"] == sum(p.released_blocks for p in plans if p is not None)
