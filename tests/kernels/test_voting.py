"""GVote's batched vote (paged cache, all requests of a layer) == the per-request selection.

Fresh random prompts each run, float64 (so the two paths agree exactly); cache slots
outside each prompt hold NaN, so reading them poisons the result.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.kernels.paged_cache import random_block_tables, write_tokens
from vllm_adakv.kernels import min_mass_above_reference, voter_probs_reference
from vllm_adakv.kernels.scoring import gather_prompt_keys
from vllm_adakv.kernels.voting import mass_above, mass_above_nucleus, mass_above_top
from vllm_adakv.methods.gvote import gvote_keep_mask, gvote_keep_masks, gvote_voters

BLOCK_SIZE = 16


def paged_prompts(lengths: list[int], heads: int, group: int, dim: int, window: int,
                  dtype=torch.float64, spread: float = 2.0):
    """Window queries ``[R, w, Hq, D]``, a NaN-poisoned paged key cache and its table."""
    table, nblocks = random_block_tables(lengths, BLOCK_SIZE)
    kc = torch.full((nblocks, heads, BLOCK_SIZE, dim), float("nan"), dtype=dtype)
    vc = torch.full_like(kc, float("nan"))
    for r, n in enumerate(lengths):
        keys = torch.randn(n, heads, dim, dtype=dtype)
        write_tokens(kc, vc, table[r], torch.arange(n), keys, keys)
    queries = torch.randn(len(lengths), window, heads * group, dim, dtype=dtype) * spread
    return queries, kc, table


def batched_masks(queries, kc, table, lengths, *, samples, p, seed, layer, caps, pool):
    """The compressor's path: voters, probabilities, c*, masks."""
    scale = queries.shape[-1] ** -0.5
    voters = gvote_voters(queries, samples, seed, layer)
    probs = voter_probs_reference(voters, kc, table, list(range(len(lengths))), lengths, scale)
    most = max(min(n, c) for n, c in zip(lengths, caps, strict=True))
    vote = min_mass_above_reference(probs, lengths, p, most)
    return gvote_keep_masks(vote, lengths, window=queries.shape[1], nucleus_p=p,
                            max_keeps=caps, pool_kernel=pool)


@pytest.mark.parametrize("p,pool,cap_share", [(0.9, 1, 0.3), (0.5, 5, 0.2), (0.99, 3, 1.0),
                                              (1.0, 1, 0.4)])
@pytest.mark.parametrize("group", [1, 4])
def test_batched_vote_equals_per_request_selection(group, p, pool, cap_share):
    """Rows of different lengths and caps in one batch give, row by row, the kept set of
    ``gvote_keep_mask`` on that request's dense keys; nothing past a prompt is kept."""
    window, heads, dim = 8, 2, 32
    lengths = [int(torch.randint(window + 1, 300, ())) for _ in range(3)]
    caps = [max(window, math.ceil(cap_share * n)) for n in lengths]
    queries, kc, table = paged_prompts(lengths, heads, group, dim, window)
    kw = dict(samples=6, p=p, seed=11, layer=3)
    got = batched_masks(queries, kc, table, lengths, caps=caps, pool=pool, **kw)
    assert got.shape == (3, heads, max(lengths))
    for r, n in enumerate(lengths):
        keys = gather_prompt_keys(kc, table[r], n)
        want = gvote_keep_mask(queries[r], keys, scale=dim**-0.5, num_samples=6, nucleus_p=p,
                               seed=11, layer_idx=3, max_keep=caps[r], pool_kernel=pool)
        assert torch.equal(got[r, :, :n], want), r
        assert not got[r, :, n:].any()
        assert (got[r].sum(-1) <= caps[r]).all()


def test_voter_probs_are_each_voters_softmax():
    """Row r, voter index g * V + v: the softmax of voter v of query head h * G + g over
    the row's prompt keys, zero beyond it."""
    window, heads, group, dim = 4, 2, 4, 16
    lengths = [40, 75]
    queries, kc, table = paged_prompts(lengths, heads, group, dim, window)
    voters = torch.randn(2, 3, heads * group, dim, dtype=torch.float64)
    probs = voter_probs_reference(voters, kc, table, [1, 0], lengths[::-1], 0.25)
    for r, (row, n) in enumerate([(1, 75), (0, 40)]):
        keys = gather_prompt_keys(kc, table[row], n)
        for h in range(heads):
            for g in range(group):
                for v in range(3):
                    want = torch.softmax(keys[h] @ voters[r, v, h * group + g] * 0.25, 0)
                    torch.testing.assert_close(probs[r, h, g * 3 + v, :n], want)
        assert (probs[r, :, :, n:] == 0).all()


def test_truncated_mass_is_exact_where_read():
    """Top-``m`` mass: exact for keys with fewer than ``m`` keys strictly above, inf below
    the m-th value; the nucleus version is exact for keys ranked within
    ``min(most, m_p)`` (``m_p`` top keys hold mass p), never below the true mass."""
    probs = torch.softmax(torch.randn(5, 300, dtype=torch.float64) * 3, -1)
    probs[0, 10:20] = probs[0, 9]  # a tie group
    exact = mass_above(probs)
    rank = (probs[:, None, :] > probs[:, :, None]).sum(-1)  # keys strictly above
    top = mass_above_top(probs, 50)
    torch.testing.assert_close(top[rank < 50], exact[rank < 50], rtol=1e-12, atol=0)
    assert torch.isinf(top[probs < probs.topk(50).values[:, -1:]]).all()
    desc = probs.sort(-1, descending=True).values.cumsum(-1)
    for p, most in [(0.5, None), (0.9, 30), (0.99, None), (1.0, 100), (0.9, 1)]:
        m_p = (desc < p).sum(-1, keepdim=True) + 1
        got = mass_above_nucleus(probs, p, most, first_m=8)
        read = rank < (m_p if most is None else m_p.clamp(max=most))
        if most is None:
            assert torch.equal(read, exact < p)
        torch.testing.assert_close(got[read], exact[read], rtol=1e-12, atol=0)
        assert (torch.isclose(got, exact, rtol=1e-12, atol=0) | torch.isinf(got)).all()
