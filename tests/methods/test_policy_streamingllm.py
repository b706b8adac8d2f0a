"""StreamingLLM: sink tokens + most recent tokens."""

from __future__ import annotations

import pytest
import torch

from tests.methods.calls import keep_counts, select_keep_mask
from vllm_adakv.methods.streamingllm import streamingllm_mask


@pytest.mark.parametrize("heads,prompt_len,window,budget,sink", [
    (4, 100, 8, 32, 4), (1, 50, 10, 14, 4), (3, 20, 2, 6, 0), (2, 64, 0, 16, 16),
    (2, 40, 8, 8, 0),
])
def test_equals_direct_definition(heads, prompt_len, window, budget, sink):
    mask = select_keep_mask("streamingllm", None, num_heads=heads, prompt_len=prompt_len,
                            window=window, layer_budget=budget, alpha=0.2, sink_tokens=sink)
    pos = torch.arange(prompt_len)
    expected = (pos < sink) | (pos >= prompt_len - (budget - sink))
    assert torch.equal(mask, expected.expand(heads, -1)), mask
    counts = keep_counts("streamingllm", None, num_heads=heads, prompt_len=prompt_len,
                         window=window, layer_budget=budget, alpha=0.2, sink_tokens=sink)
    assert counts.tolist() == [budget] * heads


def test_random_configs(rng):
    for trial in range(100):
        prompt_len = rng.randint(1, 200)
        window = rng.randint(0, prompt_len - 1)
        sink = rng.randint(0, 8)
        budget = window + sink + rng.randint(0, 250)
        heads = rng.randint(1, 8)
        mask = select_keep_mask("streamingllm", None, num_heads=heads, prompt_len=prompt_len,
                                window=window, layer_budget=budget, alpha=0.0, sink_tokens=sink)
        pos = torch.arange(prompt_len)
        expected = (pos < sink) | (pos >= prompt_len - (budget - sink)) | (budget >= prompt_len)
        assert torch.equal(mask, expected.expand(heads, -1)), f"{rng} trial={trial}"
        assert mask.sum(1).tolist() == [min(budget, prompt_len)] * heads, f"{rng} trial={trial}"


def test_keep_all_when_selectable_covers_candidates():
    assert streamingllm_mask(2, 10, 10, 4).all()
    assert streamingllm_mask(2, 10, 25, 4).all()


def test_scores_ignored(rng):
    kw = dict(num_heads=2, prompt_len=30, window=4, layer_budget=12, alpha=0.0, sink_tokens=4)
    with_scores = select_keep_mask("streamingllm", rng.randn(2, 26), **kw)
    assert torch.equal(with_scores, select_keep_mask("streamingllm", None, **kw))


def test_sink_larger_than_selectable_raises():
    with pytest.raises(ValueError, match="sink_tokens"):
        streamingllm_mask(2, 100, 3, 4)
    with pytest.raises(ValueError, match="sink_tokens"):
        select_keep_mask("streamingllm", None, num_heads=2, prompt_len=100, window=8,
                         layer_budget=10, alpha=0.0, sink_tokens=4)
    with pytest.raises(ValueError, match="sink_tokens"):
        keep_counts("streamingllm", None, num_heads=2, prompt_len=100, window=8,
                    layer_budget=10, alpha=0.0, sink_tokens=4)
    with pytest.raises(ValueError, match="sink_tokens"):
        streamingllm_mask(2, 100, 10, -1)
