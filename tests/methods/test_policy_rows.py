"""Selection for many requests of a layer at once == the same selection one request at a time.

Fresh random rows each run: different prompt lengths and budgets per row (some rows
keep everything, some only the window), padding filled with large values (it must never
be kept), ties and NaN in the scores, every method.
"""

from __future__ import annotations

import pytest
import torch

from tests.methods.calls import select_keep_mask, select_keep_masks

WINDOW = 4


def _rows(rng, heads: int, rows: int, least: int):
    lengths = [rng.randint(WINDOW + 2, 90) for _ in range(rows)]
    budgets = []
    for length in lengths:
        kind = rng.randint(0, 3)
        if kind == 0:
            budgets.append(WINDOW + least)  # only the window (and streamingllm's sinks)
        elif kind == 1:
            budgets.append(length + 3)  # everything
        else:
            budgets.append(rng.randint(WINDOW + 8, max(WINDOW + 8, length)))
    width = max(lengths) - WINDOW
    scores = torch.full((rows, heads, width), 1e9)  # padding: must never be kept
    for r, length in enumerate(lengths):
        row = rng.randn(heads, length - WINDOW).abs()
        row[:, ::5] = row[:, :1].clone()  # ties
        if r % 3 == 1:
            row[0, 1] = float("nan")
        scores[r, :, : length - WINDOW] = row
    return lengths, budgets, scores


@pytest.mark.parametrize("method", ["adakv", "snapkv", "pyramidkv", "streamingllm", "none"])
@pytest.mark.parametrize("heads", [1, 3, 8])
def test_rows_equal_single_requests(rng, method, heads):
    lengths, budgets, scores = _rows(rng, heads, rows=rng.randint(1, 6),
                                     least=2 if method == "streamingllm" else 0)
    kw = dict(num_heads=heads, window=WINDOW, alpha=0.2, sink_tokens=2)
    got = select_keep_masks(method, scores, prompt_lens=lengths, layer_budgets=budgets, **kw)
    assert got.shape == (len(lengths), heads, max(lengths)) and got.dtype == torch.bool
    for r, (length, budget) in enumerate(zip(lengths, budgets, strict=True)):
        want = select_keep_mask(method, scores[r, :, : length - WINDOW], prompt_len=length,
                                layer_budget=budget, **kw)
        assert torch.equal(got[r, :, :length], want), f"{rng} row {r}"
        assert not got[r, :, length:].any(), f"{rng} row {r}: padding kept"


def test_rows_reject_mismatched_inputs():
    scores = torch.zeros(2, 2, 10)
    kw = dict(num_heads=2, window=WINDOW, alpha=0.2, sink_tokens=0)
    with pytest.raises(ValueError, match="budgets"):
        select_keep_masks("snapkv", scores, prompt_lens=[14, 12], layer_budgets=[8], **kw)
    with pytest.raises(ValueError, match="do not hold"):
        select_keep_masks("snapkv", scores, prompt_lens=[14, 20], layer_budgets=[8, 8], **kw)
