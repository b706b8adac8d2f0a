"""topk_mask and snapkv: the per-head top-k selection."""

from __future__ import annotations

import pytest
import torch

from tests.methods.calls import select_keep_mask
from vllm_adakv.methods.common import topk_mask
from vllm_adakv.methods.snapkv import snapkv_counts


def test_topk_mask_matches_per_head_topk(rng):
    heads, cand = 6, 50
    scores = rng.randn(heads, cand)
    counts = torch.tensor([rng.randint(0, cand) for _ in range(heads)])
    mask = topk_mask(scores, counts)
    assert mask.shape == (heads, cand) and mask.dtype == torch.bool
    for h in range(heads):
        expected = torch.zeros(cand, dtype=torch.bool)
        expected[torch.topk(scores[h], int(counts[h])).indices] = True
        assert torch.equal(mask[h], expected), f"{rng} head {h}"


def test_topk_mask_ties_prefer_lower_position():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0], [5.0, 5.0, 5.0, 5.0, 5.0]])
    mask = topk_mask(scores, torch.tensor([2, 3]))
    assert mask.tolist() == [[False, True, True, False, False], [True, True, True, False, False]]


def test_topk_mask_nan_never_preferred():
    scores = torch.tensor([[float("nan"), 0.0, -1.0]])
    assert topk_mask(scores, torch.tensor([2])).tolist() == [[False, True, True]]


def test_topk_mask_bad_counts():
    with pytest.raises(ValueError):
        topk_mask(torch.zeros(3, 4), torch.tensor([1, 2]))


def test_snapkv_counts():
    assert snapkv_counts(3, 10, 4).tolist() == [4, 4, 4]
    assert snapkv_counts(2, 10, 15).tolist() == [10, 10]
    with pytest.raises(ValueError):
        snapkv_counts(0, 10, 4)
    with pytest.raises(ValueError):
        snapkv_counts(2, 10, -1)


@pytest.mark.parametrize("heads,prompt_len,window,budget", [
    (8, 200, 16, 48), (1, 64, 8, 9), (4, 40, 8, 8), (32, 300, 32, 100), (4, 30, 0, 10),
])
def test_snapkv_equals_direct_definition(rng, heads, prompt_len, window, budget):
    cand = prompt_len - window
    scores = rng.randn(heads, cand)
    mask = select_keep_mask("snapkv", scores, num_heads=heads, prompt_len=prompt_len,
                            window=window, layer_budget=budget, alpha=0.2, sink_tokens=4)
    expected = torch.zeros(heads, prompt_len, dtype=torch.bool)
    expected[:, cand:] = True
    top = torch.topk(scores, budget - window, dim=1).indices
    expected[:, :cand].scatter_(1, top, True)
    assert torch.equal(mask, expected), str(rng)
    assert mask.sum(1).tolist() == [budget] * heads, str(rng)


def _stable_sort_mask(scores, counts):
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.arange(scores.shape[1]).expand(scores.shape[0], -1)
    keep = rank < counts.unsqueeze(1)
    return torch.zeros_like(keep).scatter_(1, order, keep)


def test_topk_mask_heavy_ties_match_stable_sort(rng):
    for trial in range(50):
        heads, cand = rng.randint(1, 6), rng.randint(1, 40)
        scores = torch.randint(0, 3, (heads, cand), generator=rng.gen).float()
        scores[scores == 0] = float("-inf") if trial % 2 else 0.0
        counts = torch.randint(0, cand + 1, (heads,), generator=rng.gen)
        expected = _stable_sort_mask(scores, counts)
        assert torch.equal(topk_mask(scores, counts), expected), f"{rng} trial={trial}"


@pytest.mark.parametrize("bound_extra", [0, 3, 10_000])
def test_topk_mask_host_bound_gives_the_same_mask(rng, bound_extra):
    """``max_count`` (no device read-back) only changes how far topk looks, not the mask."""
    heads, cand = 5, 97
    scores = torch.randint(0, 6, (heads, cand), generator=rng.gen).float()  # many ties
    counts = torch.randint(0, cand + 1, (heads,), generator=rng.gen)
    counts[0] = 0
    expected = topk_mask(scores, counts)
    got = topk_mask(scores, counts, max_count=int(counts.max()) + bound_extra)
    assert torch.equal(got, expected), str(rng)
    assert torch.equal(got.sum(1), counts), str(rng)
