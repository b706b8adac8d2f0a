"""Public entry points: window always kept, counts match masks, argument validation."""

from __future__ import annotations

import pytest
import torch

from tests.methods.calls import (
    BUDGET_METHODS,
    SCORED_METHODS,
    keep_counts,
    select_keep_mask,
)


def _call(fn, method, scores, heads, prompt_len, window, budget, alpha=0.2, sink=4):
    return fn(method, scores, num_heads=heads, prompt_len=prompt_len, window=window,
              layer_budget=budget, alpha=alpha, sink_tokens=sink)


@pytest.mark.parametrize("method", BUDGET_METHODS)
@pytest.mark.parametrize("heads,prompt_len,window,budget", [
    (8, 300, 32, 64), (1, 40, 8, 12), (4, 20, 16, 40), (2, 9, 8, 8), (3, 50, 0, 10),
])
def test_window_kept_and_counts_match(rng, method, heads, prompt_len, window, budget):
    cand = prompt_len - window
    scores = rng.randn(heads, cand) * rng.randn(heads, 1).exp()
    sink = min(4, budget - window)
    mask = _call(select_keep_mask, method, scores, heads, prompt_len, window, budget, sink=sink)
    assert mask.shape == (heads, prompt_len) and mask.dtype == torch.bool
    assert mask[:, cand:].all(), f"{rng} {method}"
    counts = _call(keep_counts, method, scores, heads, prompt_len, window, budget, sink=sink)
    assert counts.dtype == torch.long
    assert torch.equal(counts, mask.sum(1)), f"{rng} {method} {counts} {mask.sum(1)}"
    if method == "none":
        assert mask.all()
    else:
        assert int(counts.sum()) == heads * min(budget, prompt_len), f"{rng} {method}"


def test_random_configs_all_methods(rng):
    for trial in range(150):
        heads = rng.randint(1, 8)
        prompt_len = rng.randint(1, 120)
        window = rng.randint(0, prompt_len - 1)
        budget = window + rng.randint(0, 130)
        sink = rng.randint(0, budget - window)
        alpha = float(torch.rand(1, generator=rng.gen))
        scores = rng.randn(heads, prompt_len - window)
        for method in BUDGET_METHODS:
            msg = f"{rng} trial={trial} {method} H={heads} L={prompt_len} w={window} B={budget}"
            mask = _call(select_keep_mask, method, scores, heads, prompt_len, window, budget,
                         alpha, sink)
            counts = _call(keep_counts, method, scores, heads, prompt_len, window, budget,
                           alpha, sink)
            assert mask[:, prompt_len - window:].all(), msg
            assert torch.equal(counts, mask.sum(1)), msg
            expected_total = heads * (prompt_len if method == "none" else min(budget, prompt_len))
            assert int(counts.sum()) == expected_total, msg


@pytest.mark.parametrize("method", SCORED_METHODS)
def test_budget_equal_window_keeps_only_window(rng, method):
    scores = rng.randn(3, 20)
    mask = _call(select_keep_mask, method, scores, 3, 28, 8, 8)
    assert mask[:, :20].sum() == 0 and mask[:, 20:].all()


def test_reduced_precision_scores(rng):
    scores = rng.randn(4, 50).to(torch.bfloat16)
    for method in SCORED_METHODS:
        mask = _call(select_keep_mask, method, scores, 4, 58, 8, 20)
        assert int(mask.sum()) == 4 * 20, f"{rng} {method}"


def test_explicit_device():
    mask = select_keep_mask("streamingllm", None, num_heads=2, prompt_len=10, window=2,
                            layer_budget=6, alpha=0.0, sink_tokens=2, device="cpu")
    assert mask.device.type == "cpu"


@pytest.mark.parametrize("method,scores,kw,match", [
    ("h2o", torch.zeros(2, 8), {}, "unknown compression method"),
    ("gvote", torch.zeros(2, 8), {}, "gvote_keep_mask"),
    ("snapkv", None, {}, "needs scores"),
    ("adakv", torch.zeros(2, 7), {}, "shape"),
    ("snapkv", torch.zeros(3, 8), {}, "shape"),
    ("pyramidkv", torch.zeros(16), {}, "2-D"),
    ("snapkv", torch.zeros(2, 8, dtype=torch.long), {}, "floating point"),
    ("snapkv", [[0.0] * 8] * 2, {}, "torch.Tensor"),
    ("snapkv", torch.zeros(2, 8), {"prompt_len": 8}, "must exceed window"),
    ("streamingllm", None, {"prompt_len": 5}, "must exceed window"),
    ("snapkv", torch.zeros(2, 8), {"layer_budget": 7}, "must be >= window"),
    ("adakv", torch.zeros(2, 8), {"alpha": 2.0}, "alpha"),
    ("snapkv", torch.zeros(0, 8), {"num_heads": 0}, "num_heads"),
    ("snapkv", torch.zeros(2, 8), {"window": -1}, "window"),
    ("snapkv", torch.zeros(2, 8), {"layer_budget": 12.5}, "integer"),
])
def test_bad_inputs_raise(method, scores, kw, match):
    args = dict(num_heads=2, prompt_len=16, window=8, layer_budget=12, alpha=0.2, sink_tokens=4)
    args.update(kw)
    for fn in (select_keep_mask, keep_counts):
        with pytest.raises(ValueError, match=match):
            fn(method, scores, **args)
