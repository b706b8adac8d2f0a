"""The expected scorer's query model and scores against direct float64 definitions and
vLLM's RoPE.

Rotations are built here as explicit 2x2 blocks per frequency (the textbook RoPE), on
fresh random queries and tables; vLLM's own ``RotaryEmbedding`` (the CPU build's torch
path) checks that the tables and layouts are read as vLLM applies them.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.paged_cache import random_block_tables
from vllm_adakv.kernels.expected import future_moments, rotate, score_expected
from vllm_adakv.kernels.expected import unrotated_moments_reference as unrotated_moments


def random_table(positions: int, rotary_dim: int, gen: torch.Generator) -> torch.Tensor:
    """A cos/sin table in vLLM's layout: row p = [cos(p f)..., sin(p f)...]."""
    freqs = torch.rand(rotary_dim // 2, generator=gen, dtype=torch.float64) * 0.5 + 1e-3
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * freqs[None]
    return torch.cat((angles.cos(), angles.sin()), -1)


def pairs(rotary_dim: int, neox: bool) -> list[tuple[int, int]]:
    """The (first, second) dims that frequency i rotates."""
    half = rotary_dim // 2
    return [(i, i + half) if neox else (2 * i, 2 * i + 1) for i in range(half)]


def rotation(table: torch.Tensor, pos: int, dim: int, rotary_dim: int, neox: bool
             ) -> torch.Tensor:
    """R_pos as a [dim, dim] float64 matrix (identity past rotary_dim)."""
    half = rotary_dim // 2
    r = torch.eye(dim, dtype=torch.float64)
    for i, (a, b) in enumerate(pairs(rotary_dim, neox)):
        c, s = table[pos, i], table[pos, half + i]
        r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("rotary_dim,dim", [(16, 16), (8, 16)])
def test_unrotated_moments_are_sums_over_transposed_rotations(neox, rotary_dim, dim):
    gen = torch.Generator().manual_seed(1 + rotary_dim + 2 * neox)
    table = random_table(64, rotary_dim, gen)
    positions = torch.randperm(64, generator=gen)[:9]
    q = torch.randn(9, 3, dim, generator=gen, dtype=torch.float64)
    back = [q[t] @ rotation(table, int(p), dim, rotary_dim, neox)  # rows: (R^T q)^T = q^T R
            for t, p in enumerate(positions)]
    total, second = unrotated_moments(q, positions, table, rotary_dim, neox)
    assert total.dtype == second.dtype == torch.float64
    torch.testing.assert_close(total, sum(back), rtol=1e-12, atol=1e-12)
    outer = sum(torch.stack([torch.outer(b[h], b[h]) for h in range(3)]) for b in back)
    torch.testing.assert_close(second, outer, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
def test_future_moments_rotate_the_gaussian_by_the_mean_rotation(neox):
    gen = torch.Generator().manual_seed(7 + neox)
    rotary_dim, dim, prompt_len, future, count = 16, 24, 40, 13, 30
    table = random_table(prompt_len + future, rotary_dim, gen)
    samples = torch.randn(count, 4, dim, generator=gen, dtype=torch.float64) * 3 + 1
    total = samples.sum(0)
    second = torch.einsum("nhd,nhe->hde", samples, samples)
    mean = samples.mean(0)
    centred = samples - mean
    cov = torch.einsum("nhd,nhe->hde", centred, centred) / count  # population covariance
    avg = sum(rotation(table, t, dim, rotary_dim, neox)
              for t in range(prompt_len, prompt_len + future)) / future
    mu, sigma = future_moments(total, second, count, prompt_len, future, table, rotary_dim,
                               neox)
    torch.testing.assert_close(mu, mean @ avg.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sigma, avg @ cov @ avg.T, rtol=1e-10, atol=1e-10)
    # Clipped to the table's positions: the last ones only.
    clipped = future_moments(total, second, count, prompt_len, 1000, table, rotary_dim, neox)
    torch.testing.assert_close(clipped[1], sigma, rtol=1e-10, atol=1e-10)
    last = rotation(table, prompt_len + future - 1, dim, rotary_dim, neox)
    beyond = future_moments(total, second, count, prompt_len + future + 5, 3, table,
                            rotary_dim, neox)
    torch.testing.assert_close(beyond[0], mean @ last.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(beyond[1], last @ cov @ last.T, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="future must be >= 1"):
        future_moments(total, second, count, prompt_len, 0, table, rotary_dim, neox)


@pytest.mark.parametrize("gqa_reduce", ["mean", "max"])
def test_score_expected_is_the_gaussian_expectation_normalised(gqa_reduce):
    """Per query head, ``E[exp(s q.k)]`` for ``q ~ N(mu, S)`` normalised over the prompt's
    keys: checked against a Monte Carlo estimate of the expectation (closed form of the
    moment generating function) and a direct float64 formula, on paged rows of different
    lengths; padding is -inf."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    heads, group, dim, bs = 2, 2, 8, 16
    lengths = [37, 20]
    block_table, nb = random_block_tables(lengths, bs)
    keys = torch.randn(nb, heads, bs, dim, generator=gen, dtype=torch.float64)
    mean = torch.randn(2, heads * group, dim, generator=gen, dtype=torch.float64)
    root = torch.randn(2, heads * group, dim, dim, generator=gen, dtype=torch.float64) * 0.3
    cov = root @ root.transpose(-1, -2)
    scale = dim**-0.5
    got = score_expected(mean, cov, keys, block_table, [1, 0], [lengths[1], lengths[0]],
                         scale, gqa_reduce=gqa_reduce, chunk=7)
    assert got.shape == (2, heads, 37) and got.dtype == torch.float32
    for r, (row, length) in enumerate(((1, 20), (0, 37))):
        blocks = block_table[row, : -(-length // bs)]
        k = keys[blocks].permute(1, 0, 2, 3).reshape(heads, -1, dim)[:, :length]
        per_head = []
        for h in range(heads * group):
            kh = k[h // group]
            logit = scale * kh @ mean[r, h] + scale**2 / 2 * torch.einsum(
                "ld,de,le->l", kh, cov[r, h], kh)
            per_head.append(torch.softmax(logit, 0))
            # The closed form is the Gaussian's expectation (1e5 samples, ~1% error).
            draws = torch.distributions.MultivariateNormal(
                mean[r, h], cov[r, h] + 1e-9 * torch.eye(dim)).sample((100000,))
            mc = torch.exp(scale * draws @ kh.T).mean(0)
            torch.testing.assert_close(mc / mc.sum(), per_head[-1], rtol=0.1, atol=1e-3)
        stacked = torch.stack(per_head).view(heads, group, length)
        want = stacked.mean(1) if gqa_reduce == "mean" else stacked.amax(1)
        torch.testing.assert_close(got[r, :, :length].double(), want, rtol=1e-6, atol=1e-7)
        assert torch.isinf(got[r, :, length:]).all()
    with pytest.raises(ValueError, match="gqa_reduce"):
        score_expected(mean, cov, keys, block_table, [0], [37], scale, gqa_reduce="sum")


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
def test_rotate_inverts_vllm_rotary_embedding(neox):
    """vLLM's RoPE (its own table and layout), then ``rotate(..., inverse=True)``, gives the
    queries back; ``rotate`` alone is vLLM's RoPE."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    head, rotary_dim = 32, 16
    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(head, max_position=256, is_neox_style=neox,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                         "partial_rotary_factor": rotary_dim / head},
                        dtype=torch.float32)
    assert rope.rotary_dim == rotary_dim
    gen = torch.Generator().manual_seed(3)
    positions = torch.randint(0, 256, (11,), generator=gen)
    q = torch.randn(11, 4 * head, generator=gen)
    rotated, _ = rope.forward_static(positions, q.clone(), None, head, rotary_dim,
                                     rope.cos_sin_cache, neox)
    table = rope.cos_sin_cache.float()
    cos, sin = table[positions].chunk(2, -1)
    back = rotate(rotated.view(11, 4, head), cos, sin, rotary_dim, neox, inverse=True)
    torch.testing.assert_close(back, q.view(11, 4, head), rtol=1e-5, atol=1e-5)
    again = rotate(q.view(11, 4, head), cos, sin, rotary_dim, neox)
    torch.testing.assert_close(again, rotated.view(11, 4, head), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("neox,rotary_dim,dim,dtype", [
    (True, 64, 64, torch.bfloat16), (False, 32, 64, torch.float32),
    (True, 16, 24, torch.float32), (False, 16, 24, torch.bfloat16)],
    ids=["neox-64-bf16", "gptj-32of64-fp32", "neox-16of24-fp32", "gptj-16of24-bf16"])
def test_triton_unrotated_moments_match_the_reference(neox, rotary_dim, dim, dtype):
    """The fused kernel (interpreter) == the torch reference on a strided view of packed
    q/k/v rows, over two spans with a partial last step; positions not contiguous."""
    pytest.importorskip("triton")
    from vllm_adakv.kernels.triton_expected import BLOCK_T, unrotated_moments_triton

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    span = 2 * BLOCK_T  # two steps per program here (production: SPAN_T)
    tokens, heads = span + BLOCK_T + 9, 3
    table = random_table(2000, rotary_dim, gen).float()
    packed = torch.randn(tokens, heads + 4, dim, generator=gen).to(dtype)
    q = packed[:, 1 : 1 + heads]  # stride(0) = (heads + 4) * dim
    positions = torch.randperm(2000, generator=gen)[:tokens]

    def check(n: int) -> None:
        want = unrotated_moments(q[:n].double(), positions[:n], table.double(), rotary_dim,
                                 neox)
        got = unrotated_moments_triton(q[:n], positions[:n], table, rotary_dim, neox,
                                       span=span)
        assert got[0].dtype == got[1].dtype == torch.float32
        assert got[0].shape == (heads, dim) and got[1].shape == (heads, dim, dim)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-3)

    check(tokens)
    check(5)  # fewer tokens than a step
    # The pass-through dims and the rotated ones both count: a wrong pairing is caught.
    got = unrotated_moments_triton(q, positions, table, rotary_dim, neox, span=span)
    wrong = unrotated_moments(q.double(), positions, table.double(), rotary_dim, not neox)
    assert not torch.allclose(got[1].double(), wrong[1], rtol=1e-3, atol=1e-2)
    empty = unrotated_moments_triton(q[:0], positions[:0], table, rotary_dim, neox)
    assert not empty[0].any() and not empty[1].any()


def test_triton_unrotated_moments_refuse_what_they_cannot_read():
    pytest.importorskip("triton")
    from vllm_adakv.kernels.triton_expected import unrotated_moments_triton

    table = torch.ones(8, 16)
    q = torch.randn(4, 2, 16)
    with pytest.raises(ValueError, match="float64"):
        unrotated_moments_triton(q.double(), torch.arange(4), table, 16, True)
    with pytest.raises(ValueError, match="unit stride"):
        unrotated_moments_triton(q.transpose(1, 2).contiguous().transpose(1, 2),
                                 torch.arange(4), table, 16, True)
    with pytest.raises(ValueError, match="fp32 cos_sin"):
        unrotated_moments_triton(q, torch.arange(4), table.double(), 16, True)
    with pytest.raises(ValueError, match="rotary_dim"):
        unrotated_moments_triton(q, torch.arange(4), table, 15, True)
    with pytest.raises(ValueError, match="multiple of"):
        unrotated_moments_triton(q, torch.arange(4), table, 16, True, span=100)
