"""Scoring reference vs a direct float64 definition with repeated KV heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.paged_cache import random_block_tables, write_tokens
from vllm_adakv.kernels import score_window_reference


def direct_scores(q, k, window, gqa_reduce, pooling, kernel):
    """q: [w, Hq, D], k: [L, H, D] float64; the textbook definition."""
    w, hq, _ = q.shape
    length, h, _ = k.shape
    g = hq // h
    k_rep = k.repeat_interleave(g, dim=1)  # [L, Hq, D]
    logits = torch.einsum("qhd,lhd->hql", q, k_rep) / q.shape[-1] ** 0.5
    for i in range(w):
        logits[:, i, length - w + i + 1 :] = float("-inf")
    s = torch.softmax(logits, -1).sum(1)  # [Hq, L]
    s = s.view(h, g, length)
    s = s.mean(1) if gqa_reduce == "mean" else s.amax(1)
    s = s[:, : length - w].unsqueeze(1)
    if pooling == "max":
        s = F.max_pool1d(s, kernel, 1, kernel // 2)
    else:
        s = F.avg_pool1d(s, kernel, 1, kernel // 2, count_include_pad=False)
    return s.squeeze(1)


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("gqa_reduce,pooling,kernel", [("mean", "max", 7), ("max", "avg", 5),
                                                        ("mean", "avg", 1)])
def test_scores_match_direct_definition(group, gqa_reduce, pooling, kernel):
    heads, dim, bs, window = 2, 32, 16, 8
    length = int(torch.randint(40, 120, ()).item())
    table, nblocks = random_block_tables([length], bs)
    kc = torch.randn(nblocks, heads, bs, dim)
    vc = torch.randn(nblocks, heads, bs, dim)
    keys = torch.randn(length, heads, dim)
    write_tokens(kc, vc, table[0], torch.arange(length), keys, torch.randn(length, heads, dim))
    q = torch.randn(window, heads * group, dim)
    got = score_window_reference(q, kc, table[0], length, dim**-0.5, gqa_reduce=gqa_reduce,
                                 pooling=pooling, pool_kernel=kernel)
    want = direct_scores(q.double(), keys.double(), window, gqa_reduce, pooling, kernel)
    assert got.shape == (heads, length - window)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
