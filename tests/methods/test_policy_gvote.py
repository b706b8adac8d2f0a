"""GVote: the vote equals its direct definition; seeding, cap, monotonicity in p and S."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_adakv.methods.gvote import (
    gvote_keep_mask,
    layer_seed,
    mass_above,
    mass_above_nucleus,
    synthetic_queries,
)


def _inputs(rng, w, hq, hkv, d, length, dtype=torch.float64, spread=2.0):
    """Window queries and keys; ``spread`` scales the logits (peakier attention)."""
    q = rng.randn(w, hq, d).to(dtype) * spread
    k = rng.randn(hkv, length, d).to(dtype)
    return q, k


def _mask(q, k, *, samples=4, p=0.9, seed=0, layer=0, cap=None, pool=1):
    return gvote_keep_mask(q, k, scale=1 / math.sqrt(q.shape[-1]), num_samples=samples,
                           nucleus_p=p, seed=seed, layer_idx=layer, max_keep=cap,
                           pool_kernel=pool)


def _reference(q, k, *, samples, p, seed, layer, cap=None, pool=1):
    """Direct definition, float64 with loops: union of nuclei + window, then the cap;
    ``pool``: a candidate counts with the best ``c*`` within ``pool // 2`` candidates."""
    w, hq, d = q.shape
    hkv, length, _ = k.shape
    group = hq // hkv
    scale = 1 / math.sqrt(d)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + layer) % (1 << 63))
    eps = [torch.randn(hq, d, generator=gen, dtype=torch.float32).double()
           for _ in range(samples)]
    keep = torch.zeros(hkv, length, dtype=torch.bool)
    for h in range(hkv):
        best = [math.inf] * length  # c*(k): min over voters of the mass above k
        for g in range(group):
            qh = h * group + g
            x = q[:, qh].double()
            mu = sum(x[i] for i in range(w)) / w
            var = sum((x[i] - mu) ** 2 for i in range(w)) / w
            voters = [mu + var.sqrt() * eps[s][qh] for s in range(samples)] + [x[w - 1]]
            for v in voters:
                logits = torch.tensor([float(v @ k[h, j].double()) * scale
                                       for j in range(length)], dtype=torch.float64)
                probs = torch.softmax(logits, 0)
                for j in range(length):
                    above = float(probs[probs > probs[j]].sum())
                    best[j] = min(best[j], above)
        cand = length - w
        r = pool // 2
        best = [min(best[i] for i in range(max(0, j - r), min(cand, j + r + 1)))
                for j in range(cand)]
        voted = [j for j in range(cand) if p >= 1.0 or best[j] < p]
        if cap is not None and len(voted) > cap - w:
            voted = sorted(voted, key=lambda j: (best[j], j))[: cap - w]
        keep[h, voted] = True
        keep[h, cand:] = True
    return keep


@pytest.mark.parametrize("w,hq,hkv,d,length,samples,p", [
    (4, 2, 1, 8, 30, 3, 0.9), (6, 4, 2, 8, 40, 4, 0.95), (1, 2, 2, 4, 12, 2, 0.5),
    (8, 8, 2, 16, 50, 1, 0.8), (3, 3, 1, 8, 25, 0, 0.9), (5, 4, 2, 8, 20, 5, 1.0),
])
def test_matches_direct_definition(rng, w, hq, hkv, d, length, samples, p):
    q, k = _inputs(rng, w, hq, hkv, d, length, spread=4.0)
    seed, layer = rng.randint(0, 1000), rng.randint(0, 40)
    got = _mask(q, k, samples=samples, p=p, seed=seed, layer=layer)
    ref = _reference(q, k, samples=samples, p=p, seed=seed, layer=layer)
    assert got.dtype == torch.bool and got.shape == (hkv, length)
    assert torch.equal(got, ref), f"{rng} seed={seed} layer={layer}"
    if p < 1.0:
        assert not got.all(), f"{rng}: nothing was dropped, the test is too easy"


@pytest.mark.parametrize("pool,cap_extra", [(3, None), (5, None), (7, 6), (3, 2)])
def test_neighbour_pooling_matches_direct_definition(rng, pool, cap_extra):
    """Min-pooled c*: a key is voted when a key within pool // 2 positions is."""
    w, length = 4, 40
    q, k = _inputs(rng, w, 4, 2, 8, length, spread=4.0)
    seed = rng.randint(0, 1000)
    cap = None if cap_extra is None else w + cap_extra
    got = _mask(q, k, samples=3, p=0.8, seed=seed, layer=1, cap=cap, pool=pool)
    ref = _reference(q, k, samples=3, p=0.8, seed=seed, layer=1, cap=cap, pool=pool)
    assert torch.equal(got, ref), f"{rng} seed={seed}"
    alone = _mask(q, k, samples=3, p=0.8, seed=seed, layer=1, cap=cap)
    if cap is None:
        assert bool((got | ~alone).all()), "pooling must keep a superset of the vote"
        assert int(got.sum()) > int(alone.sum()), f"{rng}: pooling changed nothing"
    with pytest.raises(ValueError, match="pool_kernel"):
        _mask(q, k, pool=4)


@pytest.mark.parametrize("cap_extra", [0, 1, 3, 10])
def test_capped_matches_direct_definition(rng, cap_extra):
    w, length = 4, 36
    q, k = _inputs(rng, w, 4, 2, 8, length, spread=0.5)  # flat: nuclei exceed the cap
    seed = rng.randint(0, 1000)
    cap = w + cap_extra
    got = _mask(q, k, samples=3, p=0.95, seed=seed, layer=2, cap=cap)
    ref = _reference(q, k, samples=3, p=0.95, seed=seed, layer=2, cap=cap)
    assert torch.equal(got, ref), f"{rng} seed={seed}"
    assert (got.sum(1) == cap).all(), f"{rng}: the cap did not bind"


def test_mass_above_matches_definition_with_ties(rng):
    # Small integer weights force many ties.
    raw = torch.randint(1, 5, (3, 7, 40), generator=rng.gen).double()
    probs = raw / raw.sum(-1, keepdim=True)
    got = mass_above(probs)
    for idx in torch.cartesian_prod(torch.arange(3), torch.arange(7)):
        a, b = idx.tolist()
        row = probs[a, b]
        ref = torch.stack([row[row > row[j]].sum() for j in range(40)])
        assert torch.allclose(got[a, b], ref, rtol=0, atol=1e-12), str(rng)
        # tied keys get the same value
        for j in range(40):
            assert (got[a, b][row == row[j]] == got[a, b, j]).all()


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.99])
def test_partial_sort_is_exact_inside_the_nucleus(rng, p):
    length = rng.randint(65, 700)  # beyond the first top-64, so m doubles
    peaked = torch.softmax(rng.randn(5, length).double() * rng.randint(1, 6), -1)
    raw = torch.randint(1, 4, (5, length), generator=rng.gen).double()  # many ties
    for probs in (peaked, raw / raw.sum(-1, keepdim=True)):
        full, part = mass_above(probs), mass_above_nucleus(probs, p, first_m=8)
        inside = full < p
        assert torch.equal(part[inside], full[inside]), str(rng)
        assert (part[~inside] >= p).all(), str(rng)
        assert torch.equal(part < p, inside), str(rng)


def test_float32_agrees_with_float64_away_from_the_boundary(rng):
    q, k = _inputs(rng, 8, 4, 2, 16, 300)
    got = _mask(q.float(), k.float(), p=0.9, seed=3)
    ref = _mask(q, k, p=0.9, seed=3)
    assert got.dtype == torch.bool
    # A key may flip only if its vote score sits within float32 error of p.
    diff = (got != ref).sum().item()
    assert diff <= 2, f"{rng}: {diff} keys differ"


def test_seeding(rng):
    q, k = _inputs(rng, 8, 4, 2, 16, 200)
    masks = [_mask(q, k, samples=4, p=0.8, seed=s, layer=1) for s in range(6)]
    # same request + seed -> same kept set, recomputed from scratch
    assert torch.equal(masks[2], _mask(q.clone(), k.clone(), samples=4, p=0.8, seed=2, layer=1))
    # different seeds (or layers) draw different synthetic queries ...
    draws = [synthetic_queries(q, 4, torch.Generator().manual_seed(layer_seed(s, layer)))
             for s, layer in [(0, 0), (1, 0), (0, 1)]]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    # ... and generally different kept sets
    distinct = {tuple(m.flatten().tolist()) for m in masks}
    assert len(distinct) >= 2, f"{rng}: 6 seeds gave one kept set"


def test_layer_seed_is_deterministic_and_in_range():
    assert layer_seed(0, 0) == 0 and layer_seed(1, 0) == 1_000_003 and layer_seed(0, 7) == 7
    assert layer_seed(2**62, 5) < 2**63
    assert len({layer_seed(s, layer) for s in range(20) for layer in range(40)}) == 800


def test_cap_honoured_and_a_subset(rng):
    for trial in range(20):
        w = rng.randint(1, 8)
        length = rng.randint(w, 120)
        hkv = rng.randint(1, 3)
        q, k = _inputs(rng, w, hkv * rng.randint(1, 3), hkv, 8, length,
                       spread=float(torch.rand(1, generator=rng.gen)) * 3)
        cap = rng.randint(w, length + 5)
        p = float(torch.rand(1, generator=rng.gen)) * 0.9 + 0.1
        free = _mask(q, k, p=p, seed=trial)
        capped = _mask(q, k, p=p, seed=trial, cap=cap)
        msg = f"{rng} trial={trial} w={w} L={length} cap={cap} p={p}"
        assert (capped.sum(1) <= cap).all(), msg
        assert capped[:, length - w:].all() and free[:, length - w:].all(), msg
        assert not (capped & ~free).any(), msg
        assert torch.equal(capped.sum(1), free.sum(1).clamp(max=cap)), msg


def test_kept_set_grows_with_p_and_with_samples(rng):
    q, k = _inputs(rng, 8, 4, 2, 16, 150)
    ps = [0.3, 0.5, 0.7, 0.9, 0.97, 1.0]
    by_p = [_mask(q, k, samples=4, p=p, seed=5) for p in ps]
    for small, big in zip(by_p, by_p[1:], strict=False):
        assert not (small & ~big).any(), str(rng)
    assert by_p[-1].all()
    assert by_p[0].sum() < by_p[-2].sum(), f"{rng}: p had no effect"
    by_s = [_mask(q, k, samples=s, p=0.7, seed=5) for s in (0, 1, 2, 4, 8, 16)]
    for small, big in zip(by_s, by_s[1:], strict=False):
        assert not (small & ~big).any(), str(rng)
    assert by_s[0].sum() < by_s[-1].sum(), f"{rng}: samples had no effect"


def test_synthetic_queries_follow_the_fitted_gaussian(rng):
    q = rng.randn(16, 2, 8).double() * 3 + 1
    draws = synthetic_queries(q, 4000, torch.Generator().manual_seed(rng.seed))
    mu, sd = q.mean(0), q.std(0, correction=0)
    assert draws.shape == (4000, 2, 8) and draws.dtype == torch.float64
    assert ((draws.mean(0) - mu).abs() <= 5 * sd / math.sqrt(4000)).all(), str(rng)
    assert ((draws.std(0) / sd - 1).abs() < 0.1).all(), str(rng)
    one = synthetic_queries(q[:1], 3, torch.Generator().manual_seed(0))  # w = 1: no spread
    assert torch.equal(one, q[:1].expand(3, -1, -1))


def test_reduced_precision_inputs(rng):
    q, k = _inputs(rng, 8, 4, 2, 16, 64, dtype=torch.bfloat16)
    mask = _mask(q, k, cap=20)
    assert mask.dtype == torch.bool and (mask.sum(1) <= 20).all() and mask[:, -8:].all()


@pytest.mark.parametrize("q_shape,k_shape,kw,match", [
    ((4, 2, 8), (1, 3, 8), {}, "prompt_len"),
    ((4, 3, 8), (2, 10, 8), {}, "multiple"),
    ((4, 2, 8), (1, 10, 4), {}, "head dims"),
    ((2, 8), (1, 10, 8), {}, "w, Hq, D"),
    ((4, 2, 8), (1, 10, 8), {"p": 0.0}, "nucleus_p"),
    ((4, 2, 8), (1, 10, 8), {"p": 1.5}, "nucleus_p"),
    ((4, 2, 8), (1, 10, 8), {"cap": 3}, "max_keep"),
    ((4, 2, 8), (1, 10, 8), {"samples": -1}, "num_samples"),
    ((4, 2, 8), (1, 10, 8), {"seed": -2}, "seed"),
])
def test_bad_inputs_raise(q_shape, k_shape, kw, match):
    with pytest.raises(ValueError, match=match):
        _mask(torch.zeros(q_shape), torch.zeros(k_shape), **kw)


def test_tensor_parallel_ranks_slice_the_noise_of_all_heads(rng):
    """Each rank's voters are its heads' slice of the single-rank voters, so the kept set
    of a KV head does not depend on the tensor-parallel size."""
    from vllm_adakv.methods.gvote import gvote_voters

    q = torch.randn(2, 6, 8, 16, dtype=torch.float64)  # [R, w, Hq, D]
    whole = gvote_voters(q, 5, seed=rng.seed, layer_idx=3)
    ranks = [gvote_voters(q[:, :, 4 * r : 4 * r + 4], 5, rng.seed, 3, shard=(r, 2))
             for r in range(2)]
    assert torch.equal(torch.cat(ranks, dim=2), whole)
    assert not torch.equal(ranks[0], ranks[1])
    with pytest.raises(ValueError, match="rank 2 must be < size 2"):
        gvote_voters(q, 5, 0, 3, shard=(2, 2))
