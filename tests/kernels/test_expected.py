"""The expected scorer's query model against direct float64 definitions and vLLM's RoPE.

Rotations are built here as explicit 2x2 blocks per frequency (the textbook RoPE), on
fresh random queries and tables; vLLM's own ``RotaryEmbedding`` (the CPU build's torch
path) checks that the tables and layouts are read as vLLM applies them.
"""

from __future__ import annotations

import pytest
import torch

from vllm_adakv.kernels.expected import future_query, rotate
from vllm_adakv.kernels.expected import unrotated_sum_reference as unrotated_sum


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
def test_unrotated_sum_is_the_sum_of_transposed_rotations(neox, rotary_dim, dim):
    gen = torch.Generator().manual_seed(1 + rotary_dim + 2 * neox)
    table = random_table(64, rotary_dim, gen)
    positions = torch.randperm(64, generator=gen)[:9]
    q = torch.randn(9, 3, dim, generator=gen, dtype=torch.float64)
    want = sum(q[t] @ rotation(table, int(p), dim, rotary_dim, neox)
               for t, p in enumerate(positions))  # rows: (R^T q)^T = q^T R
    got = unrotated_sum(q, positions, table, rotary_dim, neox)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
def test_future_query_is_the_mean_rotation_of_the_mean(neox):
    gen = torch.Generator().manual_seed(7 + neox)
    rotary_dim, dim, prompt_len, future = 16, 24, 40, 13
    table = random_table(prompt_len + future, rotary_dim, gen)
    mean = torch.randn(4, dim, generator=gen, dtype=torch.float64)
    want = sum(mean @ rotation(table, t, dim, rotary_dim, neox).T
               for t in range(prompt_len, prompt_len + future)) / future
    got = future_query(mean, prompt_len, future, table, rotary_dim, neox)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # Clipped to the table's positions: the last ones only.
    clipped = future_query(mean, prompt_len, 1000, table, rotary_dim, neox)
    torch.testing.assert_close(clipped, want, rtol=1e-12, atol=1e-12)
    beyond = future_query(mean, prompt_len + future + 5, 3, table, rotary_dim, neox)
    last = mean @ rotation(table, prompt_len + future - 1, dim, rotary_dim, neox).T
    torch.testing.assert_close(beyond, last, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="future must be >= 1"):
        future_query(mean, prompt_len, 0, table, rotary_dim, neox)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("rotary_dim,dim", [(64, 64), (32, 64), (16, 24)])
def test_triton_unrotated_sum_matches_the_reference(neox, rotary_dim, dim, dtype):
    """The fused kernel (interpreter) == the torch reference on a strided view of packed
    q/k/v rows, over tiles with a partial last one; positions not contiguous."""
    pytest.importorskip("triton")
    from vllm_adakv.kernels.triton_expected import BLOCK_T, unrotated_sum_triton

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    tokens, heads = 2 * BLOCK_T + 9, 3
    table = random_table(400, rotary_dim, gen).float()
    packed = torch.randn(tokens, heads + 4, dim, generator=gen).to(dtype)
    q = packed[:, 1 : 1 + heads]  # stride(0) = (heads + 4) * dim
    positions = torch.randperm(400, generator=gen)[:tokens]
    want = unrotated_sum(q.double(), positions, table.double(), rotary_dim, neox)
    got = unrotated_sum_triton(q, positions, table, rotary_dim, neox)
    assert got.dtype == torch.float32 and got.shape == (heads, dim)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    # The pass-through dims and the rotated ones both count: a wrong pairing is caught.
    wrong = unrotated_sum(q.double(), positions, table.double(), rotary_dim, not neox)
    assert not torch.allclose(got.double(), wrong, rtol=1e-3, atol=1e-3)
    # Fewer tokens than a tile, and none.
    few = unrotated_sum_triton(q[:5], positions[:5], table, rotary_dim, neox)
    torch.testing.assert_close(
        few.double(), unrotated_sum(q[:5].double(), positions[:5], table.double(), rotary_dim,
                                    neox), rtol=1e-4, atol=1e-4)
    assert not unrotated_sum_triton(q[:0], positions[:0], table, rotary_dim, neox).any()


def test_triton_unrotated_sum_refuses_what_it_cannot_read():
    pytest.importorskip("triton")
    from vllm_adakv.kernels.triton_expected import unrotated_sum_triton

    table = torch.ones(8, 16)
    q = torch.randn(4, 2, 16)
    with pytest.raises(ValueError, match="float64"):
        unrotated_sum_triton(q.double(), torch.arange(4), table, 16, True)
    with pytest.raises(ValueError, match="unit stride"):
        unrotated_sum_triton(q.transpose(1, 2).contiguous().transpose(1, 2), torch.arange(4),
                             table, 16, True)
    with pytest.raises(ValueError, match="fp32 cos_sin"):
        unrotated_sum_triton(q, torch.arange(4), table.double(), 16, True)
    with pytest.raises(ValueError, match="rotary_dim"):
        unrotated_sum_triton(q, torch.arange(4), table, 15, True)
