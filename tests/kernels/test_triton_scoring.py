"""Triton scoring (run by the Triton interpreter on CPU) == the torch reference.

Fresh random prompts each run; cache slots outside the request's prompt (the
rest of its last block and every other block) hold NaN, so reading them
poisons the result. Tolerances: fp32 inputs rtol 1e-4 / atol 1e-6 (fp32
dots); bf16/fp16 inputs rtol/atol 2e-3 against the fp32 reference on the same
rounded inputs (scores are probabilities summed over the window).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from tests.kernels.oracles import score_window_triton  # noqa: E402
from tests.kernels.paged_cache import random_block_tables, write_tokens  # noqa: E402
from vllm_adakv.kernels import score_window_reference  # noqa: E402
from vllm_adakv.kernels.scoring import score_windows_reference  # noqa: E402
from vllm_adakv.kernels.triton_scoring import score_windows_triton  # noqa: E402

BLOCK_SIZE = 16


def _case(group: int, dim: int, dtype: torch.dtype, window: int, max_len: int = 200):
    heads = 2 if group == 8 else 4 if group == 1 else 2
    length = int(torch.randint(window + 20, max_len, ()).item())
    table, nblocks = random_block_tables([length], BLOCK_SIZE)
    kc = torch.full((nblocks, heads, BLOCK_SIZE, dim), float("nan")).to(dtype)
    vc = torch.full_like(kc, float("nan"))
    keys = torch.randn(length, heads, dim).to(dtype)
    write_tokens(kc, vc, table[0], torch.arange(length), keys, torch.randn_like(keys))
    q = (torch.randn(window, heads * group, dim) * 2).to(dtype)
    return q, kc, table[0], length


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_fp32_matches_reference(group, dim):
    q, kc, blocks, length = _case(group, dim, torch.float32, window=8)
    kw = dict(gqa_reduce="mean", pooling="max", pool_kernel=7)
    want = score_window_reference(q, kc, blocks, length, dim**-0.5, **kw)
    got = score_window_triton(q, kc, blocks, length, dim**-0.5, **kw)
    assert got.shape == want.shape == (kc.shape[1], length - 8)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("gqa_reduce,pooling,kernel", [("max", "avg", 5), ("mean", "avg", 1)])
def test_reductions_and_long_window(gqa_reduce, pooling, kernel):
    """A window longer than one query tile (BLOCK_W = 64) and both GQA reductions."""
    q, kc, blocks, length = _case(4, 64, torch.float32, window=70)
    kw = dict(gqa_reduce=gqa_reduce, pooling=pooling, pool_kernel=kernel)
    want = score_window_reference(q, kc, blocks, length, 0.125, **kw)
    got = score_window_triton(q, kc, blocks, length, 0.125, **kw)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    q, kc, blocks, length = _case(4, 64, dtype, window=16)
    kw = dict(gqa_reduce="mean", pooling="max", pool_kernel=7)
    want = score_window_reference(q, kc, blocks, length, 0.125, **kw)
    got = score_window_triton(q, kc, blocks, length, 0.125, **kw)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("num_splits", [2, 3, 7, None])
def test_position_splits(num_splits):
    """Window statistics split over position ranges (some empty, some holding only keys
    after a window query) combine to the unsplit result."""
    q, kc, blocks, length = _case(4, 64, torch.float32, window=40, max_len=700)
    kw = dict(gqa_reduce="mean", pooling="max", pool_kernel=7)
    want = score_window_reference(q, kc, blocks, length, 0.125, **kw)
    got = score_window_triton(q, kc, blocks, length, 0.125, num_splits=num_splits, **kw)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_more_splits_than_tiles():
    q, kc, blocks, length = _case(1, 64, torch.float32, window=8)
    kw = dict(gqa_reduce="max", pooling="max", pool_kernel=3)
    want = score_window_reference(q, kc, blocks, length, 0.125, **kw)
    got = score_window_triton(q, kc, blocks, length, 0.125, num_splits=16, **kw)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pooling,kernel", [("max", 7), ("avg", 5), ("max", 1)])
def test_rows_of_different_lengths(pooling, kernel):
    """Several requests in one launch pair: rows of a shared block table in shuffled order,
    lengths from just above the window to several score tiles; padding stays -inf."""
    heads, group, dim, window = 2, 4, 64, 16
    lengths = [int(torch.randint(window + 1, 400, ())) for _ in range(4)]
    table, nblocks = random_block_tables(lengths, BLOCK_SIZE)
    kc = torch.full((nblocks, heads, BLOCK_SIZE, dim), float("nan"))
    vc = torch.full_like(kc, float("nan"))
    for r, n in enumerate(lengths):
        keys = torch.randn(n, heads, dim)
        write_tokens(kc, vc, table[r], torch.arange(n), keys, keys)
    queries = torch.randn(len(lengths), window, heads * group, dim) * 2
    order = [2, 0, 3, 1]  # row r of the batch is block-table row order[r]
    lens = [lengths[b] for b in order]
    kw = dict(gqa_reduce="mean", pooling=pooling, pool_kernel=kernel)
    want = score_windows_reference(queries, kc, table, order, lens, 0.125, **kw)
    got = score_windows_triton(queries, kc, table, order, lens, 0.125, num_splits=3, **kw)
    assert got.shape == want.shape == (4, heads, max(lens) - window)
    for r, n in enumerate(lens):
        assert torch.isinf(got[r, :, n - window:]).all()
        assert torch.isfinite(got[r, :, : n - window]).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_rejects_unknown_reduction():
    q, kc, blocks, length = _case(1, 64, torch.float32, window=8)
    with pytest.raises(ValueError, match="gqa_reduce"):
        score_window_triton(q, kc, blocks, length, 0.125, gqa_reduce="sum", pooling="max",
                            pool_kernel=7)


# fp8 key caches (vLLM's --kv-cache-dtype fp8): element = fp8 value * k_scale.

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def fp8_scale() -> torch.Tensor:
    """A random non-trivial per-layer scale, as vLLM holds it (one float32 value)."""
    return (0.05 + 0.6 * torch.rand(1)).float()


def _fp8_rows(group: int, dim: int, fp8: torch.dtype, q_dtype: torch.dtype, window: int):
    """Three requests over a NaN-poisoned fp8 key cache (slots outside each prompt), rows
    of the batch in shuffled block-table order; the dense dequantized keys (float64) of
    each request for the oracle."""
    heads = 2 if group == 8 else 4 if group == 1 else 2
    lengths = [int(torch.randint(window + 1, 300, ())) for _ in range(3)]
    table, nblocks = random_block_tables(lengths, BLOCK_SIZE)
    kc = torch.full((nblocks, heads, BLOCK_SIZE, dim), float("nan"), dtype=fp8)
    vc = torch.full_like(kc, float("nan"))
    k_scale = fp8_scale()
    dense = []
    for r, n in enumerate(lengths):
        keys = (torch.randn(n, heads, dim) * 3).to(fp8)
        write_tokens(kc, vc, table[r], torch.arange(n), keys, keys)
        dense.append(keys.double() * k_scale.double())
    queries = (torch.randn(3, window, heads * group, dim) * 2).to(q_dtype)
    order = [1, 2, 0]
    return (queries, kc, table, order, [lengths[b] for b in order], k_scale,
            [dense[b] for b in order])


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16], ids=["q32", "q16"])
@pytest.mark.parametrize("fp8", FP8, ids=["e4m3fn", "e5m2"])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_fp8_cache_matches_dequantized_definition(group, fp8, q_dtype):
    """Reference and Triton on an fp8 cache with a random scale == the float64 textbook
    scores (``test_scoring.direct_scores``) of the dequantized keys, at fp32 tolerance:
    fp8 keys are cast exactly to the queries' dtype, the scale applies to the logits."""
    from tests.kernels.test_scoring import direct_scores

    dim, window = 64, 16
    queries, kc, table, order, lens, k_scale, dense = _fp8_rows(group, dim, fp8, q_dtype,
                                                                window)
    kw = dict(gqa_reduce="max" if group == 4 else "mean", pooling="max", pool_kernel=5)
    ref = score_windows_reference(queries, kc, table, order, lens, dim**-0.5, k_scale=k_scale,
                                  **kw)
    got = score_windows_triton(queries, kc, table, order, lens, dim**-0.5, num_splits=3,
                               k_scale=k_scale, **kw)
    assert got.shape == ref.shape == (3, kc.shape[1], max(lens) - window)
    for r, n in enumerate(lens):
        want = direct_scores(queries[r].double(), dense[r], window, kw["gqa_reduce"], "max", 5)
        assert torch.isfinite(got[r, :, : n - window]).all()
        assert torch.isinf(got[r, :, n - window:]).all()
        torch.testing.assert_close(ref[r, :, : n - window].double(), want, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got[r, :, : n - window].double(), want, rtol=1e-4, atol=1e-6)


def test_fp8_scale_none_is_one_and_other_caches_ignore_it():
    """``k_scale=None`` reads fp8 values as they are; a bf16 cache ignores a scale (as
    vLLM does for unquantized caches); raw uint8 bytes (no fp8 view) are refused."""
    q, kc, blocks, length = _case(4, 64, torch.float32, window=8)
    kw = dict(gqa_reduce="mean", pooling="max", pool_kernel=7)
    k8 = kc.to(torch.float8_e4m3fn)
    one = torch.ones(1)
    for fn in (score_window_reference, score_window_triton):
        assert torch.equal(fn(q, k8, blocks, length, 0.125, **kw),
                           fn(q, k8, blocks, length, 0.125, k_scale=one, **kw))
    kb = kc.to(torch.bfloat16)
    for fn in (score_window_reference, score_window_triton):
        assert torch.equal(fn(q, kb, blocks, length, 0.125, **kw),
                           fn(q, kb, blocks, length, 0.125, k_scale=fp8_scale(), **kw))
        with pytest.raises(TypeError, match="view an fp8 cache"):
            fn(q, k8.view(torch.uint8), blocks, length, 0.125, k_scale=one, **kw)
