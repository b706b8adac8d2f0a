"""Every registered method, through the interfaces the package uses (registry-driven:
a new method is tested here by being registered)."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.paged_cache import random_block_tables
from vllm_adakv.config import METHODS, KVCompressionConfig, KVCompressionConfigError
from vllm_adakv.memory import plan_compression
from vllm_adakv.methods import REGISTRY, LayerRows, Method, get_method

BS, HEADS, Q_HEADS, DIM, WINDOW, LAYERS = 16, 4, 8, 32, 16, 6


def test_registry_is_the_source_of_method_names():
    assert METHODS == tuple(REGISTRY)
    assert all(isinstance(m, Method) and m.name == n for n, m in REGISTRY.items())
    with pytest.raises(ValueError, match="unknown compression method 'h2o'"):
        get_method("h2o")
    with pytest.raises(KVCompressionConfigError, match="--kv-compression"):
        KVCompressionConfig(method="h2o")


@pytest.mark.parametrize("name", list(REGISTRY))
def test_plan_follows_the_method(name):
    method = get_method(name)
    cfg = KVCompressionConfig(method=name, budget=128, window=WINDOW)
    assert cfg.enabled == method.compresses
    plan = plan_compression(cfg, 2000, HEADS, BS, LAYERS)
    if not method.compresses:
        assert plan is None
        return
    assert plan is not None and plan.kept_blocks < plan.tail_block
    assert plan.measured == method.measured
    assert plan.layer_budgets == method.layer_budgets(cfg, 2000, LAYERS)
    assert sum(plan.layer_budgets) <= LAYERS * method.budget(cfg, 2000)
    # a prompt within the budget is left alone
    assert plan_compression(cfg, method.budget(cfg, 100), HEADS, BS, LAYERS) is None


@pytest.mark.parametrize("name", [n for n, m in REGISTRY.items() if m.compresses])
def test_keep_masks_over_a_batch_of_rows(name):
    method = get_method(name)
    seed = int(torch.randint(0, 2**31, (1,)))
    torch.manual_seed(seed)
    cfg = KVCompressionConfig(method=name, budget=96, window=WINDOW)
    lengths = [700, 333, 1000]
    table, nb = random_block_tables(lengths, BS)
    key_cache = torch.randn(nb, HEADS, BS, DIM)
    layer = 2
    plans = [plan_compression(cfg, n, HEADS, BS, LAYERS) for n in lengths]
    budgets = [p.layer_budgets[layer] for p in plans]
    batch = LayerRows(cfg=cfg, layer_idx=layer, prompt_lens=lengths, budgets=budgets,
                      key_cache=key_cache, block_table=table, rows=[0, 1, 2],
                      scale=DIM**-0.5, window_queries=torch.randn(3, WINDOW, Q_HEADS, DIM))
    masks = method.keep_masks(batch)
    assert masks.shape == (3, HEADS, max(lengths)) and masks.dtype == torch.bool
    for r, (n, budget) in enumerate(zip(lengths, budgets, strict=True)):
        msg = f"seed={seed} {name} row {r}"
        assert not masks[r, :, n:].any(), msg
        assert masks[r, :, n - WINDOW : n].all(), msg
        counts = masks[r, :, :n].sum(-1)
        if method.measured:  # a cap per head
            assert (counts <= budget).all(), msg
        elif method.uniform:
            assert (counts == budget).all(), msg
        else:  # the layer's total, split over heads
            assert int(counts.sum()) == HEADS * budget and (counts >= WINDOW).all(), msg
