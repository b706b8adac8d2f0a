"""Decode plan (``vllm_adakv.decode_plan``): held blocks equal a step-by-step simulation of
the block table through the events, stay bounded, and the page region holds what the
methods keep."""

from __future__ import annotations

import random

import pytest
import torch

from vllm_adakv.config import KVCompressionConfig
from vllm_adakv.decode_plan import plan_decode
from vllm_adakv.memory import cdiv, plan_compression
from vllm_adakv.methods import get_method
from vllm_adakv.methods.adakv import adakv_counts_heads

METHODS = ("snapkv", "adakv", "pyramidkv", "streamingllm", "gvote")


@pytest.fixture
def rnd() -> random.Random:
    seed = random.SystemRandom().randrange(2**31)
    r = random.Random(seed)
    r.seed_value = seed  # type: ignore[attr-defined]
    return r


def _case(rnd: random.Random, method: str) -> dict:
    window = rnd.randint(1, 40)
    budget = window + rnd.randint(1, 200)
    return dict(cfg=KVCompressionConfig(method=method, budget=budget, window=window,
                                        sink_tokens=min(4, budget - window),
                                        decode_budget=budget),
                prompt_len=rnd.randint(1, 600), heads=rnd.choice([1, 2, 4, 8]),
                bs=rnd.choice([1, 4, 16, 32]), num_layers=rnd.randint(1, 6),
                interval=rnd.randint(1, 80))


def _simulate(c: dict, steps: int) -> list[int]:
    """Held entries of the block table after each of ``steps`` generated tokens (index N),
    token by token: allocate the entry of each new position, free between the page region
    and the window at each event that fits, check the kept tokens fit the region."""
    cfg, length, heads, bs = c["cfg"], c["prompt_len"], c["heads"], c["bs"]
    window, interval = cfg.window, c["interval"]
    method = get_method(cfg.method)
    plan = plan_decode(cfg, length, heads, bs, c["num_layers"], interval=interval)
    region = plan.page_blocks
    budgets = method.decode_layer_budgets(cfg, cfg.budget, c["num_layers"])
    prompt = plan_compression(cfg, length, heads, bs, c["num_layers"])
    table = [True] * cdiv(length, bs)  # True = held, False = null
    compressed = prompt is not None and region < length // bs
    kept = [length] * len(budgets)  # tokens per head and layer (uniform count)
    if compressed:
        assert region >= prompt.kept_blocks
        for j in range(region, length // bs):
            table[j] = False
        kept = list(prompt.layer_budgets)
    tail = length if compressed else 0  # first position of the tail (normal layout)
    held = [sum(table)]
    for n in range(1, steps + 1):
        seq = length + n
        while len(table) < cdiv(seq, bs):
            table.append(True)
        if n % interval == 0 and n >= window and region < (seq - window) // bs:
            sizes = []
            for layer, b in enumerate(budgets):
                pages_tokens = kept[layer] if compressed else 0
                candidates = pages_tokens + (seq - tail) - window
                sizes.append(min(b - window, candidates))
            if not method.measured and method.uniform:  # exact counts: they must fit
                # each layer in its own tensor: events never pool across layers
                assert max(cdiv(s, bs) for s in sizes) <= region
            assert all(table[:region])
            for j in range(region, (seq - window) // bs):
                table[j] = False
            kept, tail, compressed = sizes, seq - window, True
        held.append(sum(table))
    return held


@pytest.mark.parametrize("method", METHODS)
def test_held_blocks_equal_the_simulation(rnd, method):
    for trial in range(40):
        c = _case(rnd, method)
        plan = plan_decode(c["cfg"], c["prompt_len"], c["heads"], c["bs"], c["num_layers"],
                           interval=c["interval"])
        steps = 3 * (c["cfg"].budget + c["interval"] + c["cfg"].window)
        want = _simulate(c, steps)
        got = [plan.held_blocks(n) for n in range(steps + 1)]
        assert got == want, f"seed={rnd.seed_value} trial={trial} {c} {plan}"


@pytest.mark.parametrize("method", METHODS)
def test_held_blocks_are_bounded(rnd, method):
    for trial in range(40):
        c = _case(rnd, method)
        plan = plan_decode(c["cfg"], c["prompt_len"], c["heads"], c["bs"], c["num_layers"],
                           interval=c["interval"])
        msg = f"seed={rnd.seed_value} trial={trial} {plan}"
        length, bs = c["prompt_len"], c["bs"]
        assert plan.first_event % plan.interval == 0 and plan.first_event >= plan.window, msg
        for n in range(0, plan.first_event + 20 * plan.interval + 5 * bs):
            held = plan.held_blocks(n)
            if n >= plan.first_event:
                assert held <= plan.steady_bound, f"{msg} n={n} held={held}"
                assert plan.tail_block(n) > plan.page_blocks, msg
            else:
                assert held <= cdiv(length + n, bs), msg
        # Whatever the generation length.
        far = [plan.held_blocks(n) for n in range(10**6, 10**6 + 2 * plan.interval + 2 * bs)]
        assert max(far) <= plan.steady_bound, msg


@pytest.mark.parametrize("method", METHODS)
def test_long_prompt_region_is_the_prompt_plan(rnd, method):
    """A prompt at least every layer's budget: the page region is the prompt plan's."""
    for _ in range(20):
        c = _case(rnd, method)
        cfg = c["cfg"]
        length = 4 * cfg.budget + rnd.randint(0, 100)
        plan = plan_decode(cfg, length, c["heads"], c["bs"], c["num_layers"],
                           interval=c["interval"])
        prompt = plan_compression(cfg, length, c["heads"], c["bs"], c["num_layers"])
        if prompt is None:
            assert not plan.prefill_compressed
            continue
        assert plan.page_blocks == prompt.kept_blocks, f"seed={rnd.seed_value} {plan}"
        assert plan.prefill_compressed and plan.first_event == c["interval"] * cdiv(
            cfg.window, c["interval"])


def test_decode_budget_keeps_layers_in_their_own_tensors(rnd):
    """PyramidKV pools its prompt's head-pages across layers without a decode budget, never
    with one (decode events compact one layer's tensor at a time); the plan then holds
    its largest layer's pages."""
    pooled_seen = 0
    for _ in range(40):
        heads, bs, layers = rnd.choice([2, 4, 8]), rnd.choice([4, 16]), rnd.randint(4, 32)
        window = rnd.randint(1, 32)
        budget = window + rnd.randint(1, 300)
        length = 8 * budget + rnd.randint(0, 1000)
        plain = KVCompressionConfig(method="pyramidkv", budget=budget, window=window)
        decode = KVCompressionConfig(method="pyramidkv", budget=budget, window=window,
                                     decode_budget=budget)
        before = plan_compression(plain, length, heads, bs, layers)
        after = plan_compression(decode, length, heads, bs, layers)
        if before is None or after is None:
            continue
        pooled_seen += before.pooled
        assert not after.pooled
        assert after.kept_blocks == cdiv(max(heads * cdiv(b, bs) for b in after.layer_budgets),
                                         heads)
        assert after.kept_blocks >= before.kept_blocks
    assert pooled_seen, "no pooled PyramidKV prompt plan drawn: the check proves nothing"


def test_adakv_allocations_fit_the_page_region(rnd):
    """Real Ada-KV splits of random scores at each event fit the region (one layer)."""
    gen = torch.Generator().manual_seed(rnd.seed_value)
    for trial in range(30):
        heads, bs, window = rnd.choice([2, 4, 8]), rnd.choice([1, 4, 16]), rnd.randint(1, 16)
        budget, interval = window + rnd.randint(1, 100), rnd.randint(1, 40)
        cfg = KVCompressionConfig(method="adakv", budget=budget, window=window,
                                  alpha=rnd.random())
        length = rnd.randint(budget + 1, 4 * budget + 50)
        plan = plan_decode(cfg, length, heads, bs, 1, interval=interval)
        kept = [budget] * heads  # any split works for the first event
        for event in range(6):
            cand = [k - window + interval for k in kept] if event else \
                [budget - window + plan.first_event] * heads
            scores = torch.randn(1, heads, max(cand), generator=gen) * \
                torch.randn(1, heads, 1, generator=gen).exp()
            caps = adakv_counts_heads(scores, torch.tensor([cand]), [budget - window],
                                      cfg.alpha)[0].tolist()
            pages = sum(cdiv(c, bs) for c in caps)
            assert pages <= plan.page_blocks * heads, \
                f"seed={rnd.seed_value} trial={trial} caps={caps} {plan}"
            kept = [c + window for c in caps]


def test_plan_errors_and_none():
    cfg = KVCompressionConfig(method="snapkv", budget=64, window=8)
    with pytest.raises(ValueError, match=r"decode budget \(8\) must be greater than the window"):
        plan_decode(cfg, 100, 2, 16, 4, interval=8, budget=8)
    with pytest.raises(ValueError, match="interval must be >= 1"):
        plan_decode(cfg, 100, 2, 16, 4, interval=0)
    assert plan_decode(KVCompressionConfig(), 100, 2, 16, 4, interval=8) is None
    plan = plan_decode(cfg, 1000, 2, 16, 4, interval=8)
    with pytest.raises(ValueError, match="num_generated must be >= 0"):
        plan.held_blocks(-1)
