"""PyramidKV per-layer schedule and its selection within a layer."""

from __future__ import annotations

import pytest
import torch

from tests.methods.calls import layer_budget, select_keep_mask
from vllm_adakv.methods.pyramidkv import pyramid_layer_budgets


def _check_schedule(budgets, budget, num_layers, window, msg=""):
    assert len(budgets) == num_layers, msg
    assert all(isinstance(b, int) for b in budgets), msg
    assert sum(budgets) == budget * num_layers, msg
    assert all(a >= b for a, b in zip(budgets[:-1], budgets[1:], strict=True)), msg
    if num_layers > 1:
        assert min(budgets) >= window + 1, msg


@pytest.mark.parametrize("budget,num_layers,window,beta", [
    (2048, 32, 32, 20.0), (1024, 28, 32, 20.0), (512, 80, 16, 10.0), (400, 7, 8, 4.0),
    (333, 33, 0, 20.0), (100, 2, 4, 20.0), (64, 3, 8, 1.0),
])
def test_schedule_without_clamping(budget, num_layers, window, beta):
    budgets = pyramid_layer_budgets(budget, num_layers, window, beta)
    _check_schedule(budgets, budget, num_layers, window, str(budgets))
    assert abs(budgets[-1] - budget / beta) <= 1, budgets
    assert abs(budgets[0] - (2 * budget - budget / beta)) <= 1, budgets
    if beta > 1:
        assert budgets[0] > budgets[-1], budgets
    assert [layer_budget("pyramidkv", budget, i, num_layers, window, beta)
            for i in range(num_layers)] == budgets


@pytest.mark.parametrize("budget,num_layers,window", [
    (128, 32, 32), (64, 32, 32), (40, 28, 32), (33, 32, 32), (100, 10, 60),
])
def test_schedule_clamped_to_window(budget, num_layers, window):
    budgets = pyramid_layer_budgets(budget, num_layers, window)
    _check_schedule(budgets, budget, num_layers, window, str(budgets))
    if budget > window + 1:
        assert budgets[0] > budgets[-1], budgets
    else:
        assert budgets == [window + 1] * num_layers


def test_random_schedules(rng):
    for trial in range(300):
        num_layers = rng.randint(1, 100)
        window = rng.randint(0, 64)
        budget = window + 1 + rng.randint(0, 3000)
        beta = 1.0 + 40 * float(torch.rand(1, generator=rng.gen))
        budgets = pyramid_layer_budgets(budget, num_layers, window, beta)
        msg = f"{rng} trial={trial} B={budget} N={num_layers} w={window} beta={beta}"
        _check_schedule(budgets, budget, num_layers, window, msg)
        if num_layers > 1 and budget / beta >= window + 1:
            assert abs(budgets[-1] - budget / beta) <= 1, msg


def test_single_layer():
    assert pyramid_layer_budgets(128, 1, 32) == [128]
    assert layer_budget("pyramidkv", 128, 0, 1, 32) == 128


def test_other_methods_use_flat_budget():
    for method in ("none", "snapkv", "adakv", "streamingllm"):
        assert layer_budget(method, 128, 5, 32, 32) == 128


@pytest.mark.parametrize("bad", [
    dict(budget=32, num_layers=4, window=32),       # budget < window + 1
    dict(budget=0, num_layers=4, window=0),
    dict(budget=64, num_layers=0, window=8),
    dict(budget=64, num_layers=4, window=8, beta=0.5),
    dict(budget=64, num_layers=4, window=8, beta=float("inf")),
    dict(budget=64.0, num_layers=4, window=8),
])
def test_bad_schedule_args(bad):
    with pytest.raises(ValueError):
        pyramid_layer_budgets(**bad)


def test_bad_layer_idx():
    with pytest.raises(ValueError, match="layer_idx"):
        layer_budget("pyramidkv", 128, 32, 32, 16)
    with pytest.raises(ValueError, match="layer_idx"):
        layer_budget("snapkv", 128, -1, 32, 16)


def test_selection_is_snapkv_with_layer_budget(rng):
    heads, prompt_len, window, budget, num_layers = 4, 600, 16, 128, 12
    budgets = pyramid_layer_budgets(budget, num_layers, window)
    total = 0
    for idx in range(num_layers):
        lb = layer_budget("pyramidkv", budget, idx, num_layers, window)
        assert lb == budgets[idx]
        scores = rng.randn(heads, prompt_len - window)
        kw = dict(num_heads=heads, prompt_len=prompt_len, window=window, layer_budget=lb,
                  alpha=0.2, sink_tokens=4)
        pyr = select_keep_mask("pyramidkv", scores, **kw)
        assert torch.equal(pyr, select_keep_mask("snapkv", scores, **kw)), f"{rng} layer {idx}"
        assert pyr.sum(1).tolist() == [lb] * heads, f"{rng} layer {idx}"
        total += int(pyr.sum())
    assert total == heads * budget * num_layers, str(rng)
