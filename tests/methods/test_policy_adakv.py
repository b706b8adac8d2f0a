"""Ada-KV allocation: exact totals, safeguard floor, alpha=0 == layer-wide top-k."""

from __future__ import annotations

import math

import pytest
import torch

from tests.methods.calls import keep_counts, select_keep_mask
from vllm_adakv.methods.adakv import adakv_counts


def _mask(scores, prompt_len, window, budget, alpha):
    return select_keep_mask("adakv", scores, num_heads=scores.shape[0], prompt_len=prompt_len,
                            window=window, layer_budget=budget, alpha=alpha, sink_tokens=4)


@pytest.mark.parametrize("heads,prompt_len,window,budget", [
    (8, 256, 32, 64), (4, 100, 8, 20), (1, 50, 4, 10), (32, 500, 16, 17), (2, 20, 0, 5),
])
def test_alpha_zero_is_layer_wide_topk(rng, heads, prompt_len, window, budget):
    cand = prompt_len - window
    sel = budget - window
    scores = rng.randn(heads, cand)
    mask = _mask(scores, prompt_len, window, budget, 0.0)
    expected_cand = torch.zeros(heads * cand, dtype=torch.bool)
    expected_cand[torch.topk(scores.flatten(), heads * sel).indices] = True
    assert torch.equal(mask[:, :cand], expected_cand.view(heads, cand)), str(rng)
    assert mask[:, cand:].all(), str(rng)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.2, 0.37, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("heads,prompt_len,window,budget", [
    (8, 256, 32, 64), (4, 100, 8, 20), (1, 50, 4, 10), (32, 700, 16, 41), (6, 33, 3, 7),
])
def test_layer_total_and_floor(rng, alpha, heads, prompt_len, window, budget):
    cand = prompt_len - window
    sel = budget - window
    # Skewed scores so some heads get many hits and others few.
    scores = rng.randn(heads, cand) * torch.linspace(0.1, 3.0, heads).unsqueeze(1)
    mask = _mask(scores, prompt_len, window, budget, alpha)
    kept = mask.sum(1)
    assert int(kept.sum()) == heads * budget, f"{rng} kept={kept.tolist()}"
    assert int(kept.min()) >= window + math.floor(alpha * sel), f"{rng} kept={kept.tolist()}"
    assert int(kept.max()) <= prompt_len, str(rng)
    counts = keep_counts("adakv", scores, num_heads=heads, prompt_len=prompt_len, window=window,
                         layer_budget=budget, alpha=alpha, sink_tokens=4)
    assert torch.equal(counts, kept), str(rng)
    # Each head keeps its own top-cap candidates.
    for h in range(heads):
        n = int(kept[h]) - window
        top = torch.topk(scores[h], n).indices
        assert mask[h, top].all() and int(mask[h, :cand].sum()) == n, f"{rng} head {h}"


def test_random_allocation_invariants(rng):
    for trial in range(200):
        heads = rng.randint(1, 12)
        cand = rng.randint(1, 40)
        sel = rng.randint(0, cand + 5)
        alpha = float(torch.rand(1, generator=rng.gen))
        scores = rng.randn(heads, cand) * rng.randn(heads, 1).exp()
        caps = adakv_counts(scores, sel, alpha)
        s = min(sel, cand)
        msg = f"{rng} trial={trial} H={heads} C={cand} sel={sel} alpha={alpha} caps={caps}"
        assert caps.dtype == torch.long and caps.shape == (heads,), msg
        assert int(caps.sum()) == heads * s, msg
        assert int(caps.min()) >= math.floor(alpha * s) and int(caps.max()) <= cand, msg
        flat = torch.zeros(heads * cand, dtype=torch.bool)
        flat[torch.topk(scores.flatten(), heads * s).indices] = True
        hits = flat.view(heads, cand).sum(1)
        ideal = alpha * s + (1 - alpha) * hits.double()
        assert ((caps.double() - ideal).abs() < 1).all(), msg
        assert torch.equal(adakv_counts(scores, sel, 0.0), hits), msg


def test_alpha_one_is_uniform(rng):
    scores = rng.randn(5, 60) * torch.arange(1, 6).unsqueeze(1)
    assert adakv_counts(scores, 13, 1.0).tolist() == [13] * 5, str(rng)


def test_single_head_equals_snapkv(rng):
    scores = rng.randn(1, 90)
    kw = dict(num_heads=1, prompt_len=100, window=10, layer_budget=30, sink_tokens=4)
    ada = select_keep_mask("adakv", scores, alpha=0.0, **kw)
    snap = select_keep_mask("snapkv", scores, alpha=0.0, **kw)
    assert torch.equal(ada, snap), str(rng)


def test_ties_are_deterministic():
    scores = torch.zeros(3, 10)
    scores[1, 5:] = 1.0
    first = _mask(scores, 14, 4, 8, 0.0)
    # Global top-12: the five 1.0s in head 1, then ties -> lowest flat index (head 0).
    assert first[:, :10].sum(1).tolist() == [7, 5, 0]
    assert first[0, :7].all() and first[1, 5:10].all()
    for _ in range(3):
        assert torch.equal(_mask(scores, 14, 4, 8, 0.0), first)


def test_keep_all_when_budget_exceeds_prompt(rng):
    scores = rng.randn(4, 12)
    mask = _mask(scores, 16, 4, 40, 0.2)
    assert mask.all(), str(rng)
    assert adakv_counts(scores, 100, 0.5).tolist() == [12] * 4


def test_bad_alpha():
    with pytest.raises(ValueError, match="alpha"):
        adakv_counts(torch.zeros(2, 5), 3, 1.5)
    with pytest.raises(ValueError, match="alpha"):
        _mask(torch.zeros(2, 5), 8, 3, 5, -0.1)


def test_spread_one_per_head_then_greedy():
    from vllm_adakv.kernels.allocation import _spread

    room = torch.tensor([0, 2, 5, 1])
    order = torch.tensor([0, 1, 2, 3])
    assert _spread(torch.tensor(3), room, order).tolist() == [0, 1, 1, 1]
    assert _spread(torch.tensor(5), room, order).tolist() == [0, 2, 2, 1]
    assert _spread(torch.tensor(2), room, torch.tensor([3, 2, 1, 0])).tolist() == [0, 0, 1, 1]
    assert _spread(torch.tensor(0), room, order).tolist() == [0, 0, 0, 0]


def test_heavy_ties_alpha_zero_matches_stable_global_sort(rng):
    for trial in range(50):
        heads, cand = rng.randint(1, 6), rng.randint(2, 30)
        sel = rng.randint(0, cand - 1)
        scores = torch.randint(0, 3, (heads, cand), generator=rng.gen).float()
        order = torch.sort(scores.flatten(), descending=True, stable=True).indices
        expected = torch.zeros(heads * cand, dtype=torch.bool)
        expected[order[: heads * sel]] = True
        mask = _mask(scores, cand + 2, 2, sel + 2, 0.0)
        assert torch.equal(mask[:, :cand], expected.view(heads, cand)), f"{rng} trial={trial}"
