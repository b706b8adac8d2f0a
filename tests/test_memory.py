"""plan_compression: when a prompt is compressed and how many blocks it keeps."""

from __future__ import annotations

import math
import random

import pytest

from vllm_adakv.config import METHODS, KVCompressionConfig
from vllm_adakv.memory import plan_compression
from vllm_adakv.methods.pyramidkv import pyramid_layer_budgets

ENABLED = tuple(m for m in METHODS if m != "none")


def ceil_div(a: int, b: int) -> int:
    return math.ceil(a / b)


@pytest.fixture
def rnd() -> random.Random:
    seed = random.SystemRandom().randrange(2**31)
    r = random.Random(seed)
    r.seed_value = seed  # type: ignore[attr-defined]
    return r


def _cfg(method: str, budget: int, window: int, **kw) -> KVCompressionConfig:
    if method == "streamingllm":
        kw.setdefault("sink_tokens", min(4, budget - window))
    return KVCompressionConfig(method=method, budget=budget, window=window, **kw)


# ------------------------------------------------------------------ no plan


def test_method_none_never_plans():
    cfg = KVCompressionConfig(method="none", budget=64, window=8)
    for prompt_len in (1, 64, 65, 1000, 100_000):
        assert plan_compression(cfg, prompt_len, 8, 16, 4) is None


@pytest.mark.parametrize("method", ENABLED)
@pytest.mark.parametrize("delta", [0, 1, 63])
def test_prompt_within_budget_never_plans(method, delta):
    cfg = _cfg(method, 64, 8)
    assert plan_compression(cfg, 64 - delta, 4, 1, 3) is None


@pytest.mark.parametrize("method", ["snapkv", "streamingllm", "adakv"])
def test_no_plan_when_no_block_would_be_released(method):
    # budget 100, block 32: snapkv keeps ceil(100/32) = 4 blocks, adakv at most 5.
    cfg = _cfg(method, 100, 32)
    kept = plan_compression(cfg, 10_000, 2, 32, 1).kept_blocks
    for prompt_len in range(101, 32 * (kept + 1)):
        assert plan_compression(cfg, prompt_len, 2, 32, 1) is None, prompt_len
    plan = plan_compression(cfg, 32 * (kept + 1), 2, 32, 1)
    assert plan is not None and plan.released_blocks == 1


# ------------------------------------------------------------------ snapkv / streamingllm


@pytest.mark.parametrize("method", ["snapkv", "streamingllm"])
@pytest.mark.parametrize("budget,window,bs,heads", [
    (64, 8, 16, 1), (65, 8, 16, 8), (100, 32, 32, 2), (1024, 32, 16, 8), (33, 32, 1, 4),
    (2, 1, 128, 3),
])
def test_uniform_methods_keep_exactly_ceil_budget_over_block(method, budget, window, bs, heads):
    cfg = _cfg(method, budget, window)
    expected = ceil_div(budget, bs)
    prompt_len = bs * (expected + 3) + 5
    plan = plan_compression(cfg, prompt_len, heads, bs, 6)
    assert plan is not None
    assert plan.kept_blocks == expected
    assert plan.layer_budgets == (budget,) * 6
    assert plan.tail_block == prompt_len // bs
    assert plan.released_blocks == plan.tail_block - expected >= 1
    assert (plan.prompt_len, plan.block_size, plan.num_kv_heads) == (prompt_len, bs, heads)


# ------------------------------------------------------------------ adakv


def _random_counts(r: random.Random, heads: int, total: int, cap: int, bs: int) -> list[int]:
    """Random n_h with 0 <= n_h <= cap and sum == total (total <= heads * cap)."""
    style = r.randrange(4)
    if style == 0:  # random transfers away from the uniform split
        n = [total // heads] * heads
        for i in range(total % heads):
            n[i] += 1
        for _ in range(r.randrange(4 * heads + 1)):
            i, j = r.randrange(heads), r.randrange(heads)
            move = min(n[i], cap - n[j])
            if i != j and move > 0:
                amount = r.randint(1, move)
                n[i] -= amount
                n[j] += amount
        return n
    if style == 1:  # random cut points, clamped and repaired
        cuts = sorted(r.randint(0, total) for _ in range(heads - 1))
        n = [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]
    elif style == 2:  # adversarial: as many heads as possible at k * bs + 1
        n = [min(cap, bs * r.randrange(0, cap // bs + 1) + 1) for _ in range(heads)]
    else:  # one head saturated, the rest spread
        n = [0] * heads
        n[r.randrange(heads)] = cap
    # Repair to 0 <= n_h <= cap, sum == total.
    n = [max(0, min(cap, x)) for x in n]
    diff = total - sum(n)
    order = list(range(heads))
    while diff:
        r.shuffle(order)
        for h in order:
            if diff > 0 and n[h] < cap:
                step = r.randint(1, min(diff, cap - n[h]))
                if r.random() < 0.5:  # prefer landing on a fresh page
                    step = min(step, max(1, (-n[h]) % bs + 1))
                n[h] += step
                diff -= step
            elif diff < 0 and n[h] > 0:
                step = r.randint(1, min(-diff, n[h]))
                n[h] -= step
                diff += step
            if not diff:
                break
    return n


def _check_adakv_bound(r, seed, prompt_len, budget, heads, bs, kept_blocks, draws):
    bound = kept_blocks * heads
    for _ in range(draws):
        n = _random_counts(r, heads, heads * budget, prompt_len, bs)
        assert sum(n) == heads * budget and all(0 <= x <= prompt_len for x in n)
        pages = sum(ceil_div(x, bs) for x in n)
        assert pages <= bound, (
            f"seed={seed}: L={prompt_len} B={budget} H={heads} bs={bs} "
            f"kept={kept_blocks} counts={n} pages={pages}"
        )


@pytest.mark.parametrize("budget,window,bs,heads", [
    (64, 8, 16, 8), (100, 32, 32, 2), (33, 32, 1, 4), (1024, 32, 16, 8), (130, 2, 64, 5),
    (17, 1, 16, 32),
])
def test_adakv_kept_blocks_hold_any_head_split(rnd, budget, window, bs, heads):
    seed = rnd.seed_value
    cfg = _cfg("adakv", budget, window)
    prompt_len = bs * (ceil_div(budget, bs) + 4) + rnd.randrange(bs)
    plan = plan_compression(cfg, prompt_len, heads, bs, 2)
    assert plan is not None, f"seed={seed}"
    assert ceil_div(budget, bs) <= plan.kept_blocks <= ceil_div(budget, bs) + 1, f"seed={seed}"
    _check_adakv_bound(rnd, seed, prompt_len, budget, heads, bs, plan.kept_blocks, 300)


def test_adakv_one_head_one_block_size_is_exact():
    # With a single head there is no freedom: same as snapkv.
    for budget in (33, 64, 65, 200):
        a = plan_compression(_cfg("adakv", budget, 32), 5000, 1, 16, 1)
        s = plan_compression(_cfg("snapkv", budget, 32), 5000, 1, 16, 1)
        assert a.kept_blocks == s.kept_blocks == ceil_div(budget, 16)


def test_adakv_uneven_split_needs_the_extra_block():
    # Budget 16 per head, block 16: snapkv needs 1 block, but adakv may split the
    # 64 tokens of 4 heads as 15+17+17+15, i.e. 1+2+2+1 = 6 head-pages > 4.
    assert plan_compression(_cfg("snapkv", 16, 1), 1000, 4, 16, 1).kept_blocks == 1
    plan = plan_compression(_cfg("adakv", 16, 1), 1000, 4, 16, 1)
    assert plan.kept_blocks == 2
    assert sum(ceil_div(x, 16) for x in (15, 17, 17, 15)) <= plan.kept_blocks * 4


# ------------------------------------------------------------------ pyramidkv


@pytest.mark.parametrize("budget,window,layers,beta", [
    (64, 8, 4, 20.0), (256, 32, 32, 20.0), (100, 10, 7, 2.0), (40, 32, 12, 1.0),
    (50, 1, 1, 20.0),
])
def test_pyramidkv_pools_pages_across_layers(budget, window, layers, beta):
    bs, heads = 16, 4
    cfg = _cfg("pyramidkv", budget, window, pyramid_beta=beta)
    per_layer = pyramid_layer_budgets(budget, layers, window, beta)
    top = max(per_layer)
    assert top >= budget
    prompt_len = bs * (ceil_div(top, bs) + 2) + 3
    plan = plan_compression(cfg, prompt_len, heads, bs, layers)
    assert plan is not None
    assert plan.layer_budgets == tuple(min(prompt_len, b) for b in per_layer)
    # Pages of all layers pooled: sum of per-layer pages over (layers * H) per block,
    # never more than sizing every layer like the largest.
    pooled = max(1, ceil_div(sum(heads * ceil_div(min(prompt_len, b), bs) for b in per_layer),
                             layers * heads))
    assert plan.kept_blocks == min(pooled, ceil_div(top, bs))
    assert plan.pooled == (pooled < ceil_div(top, bs))
    assert not plan.measured


@pytest.mark.parametrize("method", ["snapkv", "adakv", "streamingllm"])
def test_uniform_budgets_keep_layers_in_their_own_tensors(method):
    cfg = _cfg(method, 300, 16)
    plan = plan_compression(cfg, 4000, 8, 16, 32)
    assert plan is not None and not plan.pooled and not plan.measured


def test_gvote_is_pooled_and_measured_at_its_cap():
    cfg = KVCompressionConfig(method="gvote", max_budget=256, window=16)
    plan = plan_compression(cfg, 4000, 8, 16, 32)
    assert plan.pooled and plan.measured and plan.kept_blocks == 256 // 16


def test_pooling_counts_only_the_compressed_layers():
    # Two full-attention layers out of six (the others sliding-window): the pooled
    # blocks follow the pyramid budgets of layers 0 and 3 only.
    cfg = _cfg("pyramidkv", 64, 8)
    budgets = pyramid_layer_budgets(64, 6, 8, 20.0)
    plan = plan_compression(cfg, 500, 4, 16, 6, (0, 3))
    pages = [4 * ceil_div(budgets[i], 16) for i in (0, 3)]
    assert plan.kept_blocks == min(ceil_div(sum(pages), 2 * 4), ceil_div(max(pages), 4))


def test_pyramidkv_layer_budget_clamped_to_prompt():
    # Layer 0 wants about 2B - B/beta = 390 tokens: a prompt shorter than that keeps all
    # of its tokens in the first layers (budgets clamped to L). Pooled across layers, the
    # pages of the layers that keep less still free blocks.
    cfg = _cfg("pyramidkv", 200, 8)
    budgets = pyramid_layer_budgets(200, 8, 8, 20.0)
    top = max(budgets)
    assert top > 300
    for prompt_len in (201, 300, top - 1, top):
        for bs in (1, 2, 16, 32):
            plan = plan_compression(cfg, prompt_len, 2, bs, 8)
            kept = [min(prompt_len, b) for b in budgets]
            pooled = max(1, ceil_div(sum(2 * ceil_div(n, bs) for n in kept), 8 * 2))
            if pooled >= prompt_len // bs:
                assert plan is None, (prompt_len, bs)
                continue
            assert plan is not None and plan.pooled, (prompt_len, bs)
            assert plan.layer_budgets == tuple(kept)
            assert plan.kept_blocks == pooled
    plan = plan_compression(cfg, 300, 2, 1, 8)
    assert plan.layer_budgets[0] == 300 and plan.released_blocks > 0


# ------------------------------------------------------------------ random sweep


def test_random_sweep(rnd):
    seed = rnd.seed_value
    for _ in range(400):
        method = rnd.choice(ENABLED)
        bs = rnd.choice([1, 2, 4, 8, 16, 32, 64])
        heads = rnd.choice([1, 2, 3, 4, 8, 16])
        window = rnd.randint(1, 64)
        budget = window + rnd.randint(1, 512)
        layers = rnd.randint(1, 40)
        beta = rnd.choice([1.0, 2.0, 5.0, 20.0])
        prompt_len = rnd.randint(1, 6 * budget + 4 * bs)
        cfg = _cfg(method, budget, window, pyramid_beta=beta)
        ctx = (f"seed={seed} method={method} L={prompt_len} B={budget} w={window} "
               f"H={heads} bs={bs} layers={layers} beta={beta}")
        plan = plan_compression(cfg, prompt_len, heads, bs, layers)
        tail = prompt_len // bs

        if prompt_len <= budget:
            assert plan is None, ctx
            continue
        if method == "pyramidkv":
            per_layer = [min(prompt_len, b)
                         for b in pyramid_layer_budgets(budget, layers, window, beta)]
        else:
            per_layer = [budget] * layers
        if method == "adakv":
            lo, hi = ceil_div(budget, bs), ceil_div(budget, bs) + 1
        else:
            lo = hi = ceil_div(max(per_layer), bs)
        if method == "pyramidkv":  # pooled across layers where that takes fewer blocks
            pooled = ceil_div(sum(heads * ceil_div(b, bs) for b in per_layer), layers * heads)
            lo = hi = min(hi, max(1, pooled))

        if plan is None:
            # Only allowed when nothing would be released.
            assert hi >= tail, ctx
            continue
        assert plan.layer_budgets == tuple(per_layer), ctx
        assert lo <= plan.kept_blocks <= hi, ctx
        assert 1 <= plan.kept_blocks < tail, ctx
        assert plan.tail_block == tail, ctx
        assert plan.released_blocks == tail - plan.kept_blocks >= 1, ctx
        assert (plan.prompt_len, plan.block_size, plan.num_kv_heads) == (
            prompt_len, bs, heads), ctx
        if method == "adakv":
            _check_adakv_bound(rnd, seed, prompt_len, budget, heads, bs, plan.kept_blocks, 20)
        # Deterministic: scheduler and workers must agree.
        assert plan_compression(cfg, prompt_len, heads, bs, layers) == plan, ctx


# ------------------------------------------------------------------ gvote: planned at its cap


def _gvote(**kw) -> KVCompressionConfig:
    return KVCompressionConfig(method="gvote", **kw)


def test_gvote_cap_definition(rnd):
    from vllm_adakv.methods.gvote import gvote_cap

    seed = rnd.seed_value
    for _ in range(300):
        window = rnd.randint(1, 64)
        max_budget = rnd.choice([0, window + rnd.randint(1, 500)])
        ratio = rnd.choice([1.0, 1.5, 2.0, 4.0, 7.3, 20.0])
        budget = window + rnd.randint(1, 500)
        prompt_len = rnd.randint(1, 3000)
        cfg = _gvote(budget=budget, window=window, max_budget=max_budget, min_compression=ratio)
        caps = ([max_budget] if max_budget else []) + ([int(prompt_len // ratio)]
                                                        if ratio > 1 else [])
        expected = max(window, min(prompt_len, min(caps) if caps else budget))
        assert gvote_cap(cfg, prompt_len) == expected, (seed, cfg, prompt_len)


@pytest.mark.parametrize("kw,prompt_len,cap", [
    ({"max_budget": 256}, 1000, 256),
    ({"min_compression": 4.0}, 1000, 250),
    ({"max_budget": 200, "min_compression": 4.0}, 1000, 200),
    ({"max_budget": 300, "min_compression": 4.0}, 1000, 250),
    ({"budget": 130}, 1000, 130),  # neither cap: --kv-budget
    ({"min_compression": 40.0}, 1000, 32),  # never below the window
])
def test_gvote_plans_every_layer_at_its_cap(kw, prompt_len, cap):
    bs, heads, layers = 16, 4, 3
    plan = plan_compression(_gvote(**kw), prompt_len, heads, bs, layers)
    assert plan is not None
    assert plan.layer_budgets == (cap,) * layers
    assert plan.kept_blocks == ceil_div(cap, bs)  # each head holds up to cap tokens
    assert plan.tail_block == prompt_len // bs


def test_gvote_no_plan_when_the_cap_covers_the_prompt_or_frees_nothing():
    assert plan_compression(_gvote(max_budget=500), 500, 2, 16, 2) is None
    assert plan_compression(_gvote(min_compression=1.0, budget=1024), 1000, 2, 16, 2) is None
    # cap 100 needs 4 blocks of 32; a 159-token prompt has tail block 4: nothing to free
    assert plan_compression(_gvote(max_budget=100), 159, 2, 32, 2) is None
    assert plan_compression(_gvote(max_budget=100), 160, 2, 32, 2).released_blocks == 1


def test_page_usage_counts_reserved_and_filled_pages():
    from vllm_adakv.memory import page_usage

    plan = plan_compression(_gvote(max_budget=64, window=8), 1000, 2, 16, 3)
    assert plan.kept_blocks == 4
    # layer 0 full at the cap, layer 1 partly, layer 2 only the window
    usage = page_usage(plan, [[64, 64], [17, 33], [8, 8]])
    assert usage.reserved_pages == 4 * 2 * 3
    assert usage.used_pages == 8 + (2 + 3) + 2
    assert usage.kept_tokens == 64 + 64 + 17 + 33 + 8 + 8
    assert usage.waste == pytest.approx(1 - 15 / 24)
    assert usage.slot_waste == pytest.approx(1 - 194 / (24 * 16))
    assert usage.max_head_tokens == 64
    assert usage.layer_pages == (8, 5, 2)
    assert usage.exact_blocks == 4  # layer 0 fills its 4 blocks
    assert usage.pooled_blocks == ceil_div(15, 2 * 3)
    low = page_usage(plan, [[20, 1], [8, 8], [8, 8]])
    assert low.layer_pages == (3, 2, 2) and low.exact_blocks == 2 and low.pooled_blocks == 2
