"""The start-up warm-up launches every compressed-path kernel without error (interpreter).

That it leaves nothing to compile during inference is checked on a GPU, where vLLM's JIT
monitor runs in error mode (tests/gpu/test_engine_gpu.py). Here: the compaction launches
of other batches (other lengths, rows, layer counts; in place and into fresh destination
blocks given as int32, int64 or row-strided tables) use only variants the warm-up
compiled, as Triton specialises their arguments on a GPU (``sm90_compile.variant``); so
do scoring, voter attention and the decode of another batch, and the expected scorer's
query sums of another chunk. With an fp8 cache (``cache_dtype``) the same holds for the
fp8 variants, launched with vLLM's 0-dim per- layer scales, and every scoring, voting
and decode variant the warm-up compiles is an fp8 one."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("triton")

from tests.kernels.paged_cache import random_block_tables  # noqa: E402
from vllm_adakv.kernels.warmup import warm_up  # noqa: E402

BS = 16


def _compact_other_batches(kv_heads: int, dim: int, dtype: torch.dtype) -> None:
    """Own-layer and pooled compaction of a batch unlike the warm-up's, as the engine
    launches them: in place and into fresh destination blocks."""
    from vllm_adakv.kernels.triton_compaction import (
        compact_pooled_rows_triton,
        compact_rows_triton,
    )

    lengths = [300, 77, 150]
    table, nb = random_block_tables(lengths, BS)
    layers = 3
    fresh = nb + torch.randperm(3 * table.shape[1]).view(3, -1).to(torch.int32)
    per_layer = nb + fresh.numel()
    kv = torch.randn(layers * per_layer, kv_heads, BS, 2 * dim).to(dtype)
    keys, values = kv[..., :dim], kv[..., dim:]
    masks = torch.zeros(layers, 3, kv_heads, max(lengths), dtype=torch.bool)
    for r, n in enumerate(lengths):
        masks[:, r, :, n - 20:n] = True
        masks[0, r, :, : n // 2] = True
    kept = [-(-n // BS) for n in lengths]
    wide = torch.zeros(3, 32, dtype=torch.int32)  # a row stride of 32 (16-divisible)
    wide[:, 1:1 + fresh.shape[1]] = fresh
    for dst in (None, fresh, fresh.long(), wide[:, 1:1 + fresh.shape[1]]):
        compact_rows_triton(keys[:per_layer], values[:per_layer], table, [1, 2, 0], masks[0],
                            kept, dst_blocks=dst)
        bases = torch.arange(layers, dtype=torch.int32) * per_layer
        for kept_blocks in ([None] * 3, [None, kept[1], kept[2]]):
            compact_pooled_rows_triton(keys, values, table, [1, 2, 0],
                                       masks.transpose(0, 1), bases, kept_blocks,
                                       dst_blocks=dst)


def _attend_other_batch(q_heads: int, kv_heads: int, dim: int, dtype: torch.dtype) -> None:
    """Scoring, voter attention and the decode (one split, split-K, balanced) of a batch
    unlike the warm-up's, with 0-dim float32 scales as vLLM's layers hold them."""
    from vllm_adakv.kernels.decode import row_table
    from vllm_adakv.kernels.triton_decode import headwise_attention_ranges_triton
    from vllm_adakv.kernels.triton_expected import unrotated_moments_triton
    from vllm_adakv.kernels.triton_scoring import score_windows_triton
    from vllm_adakv.kernels.triton_voting import voter_probs_triton

    lengths = [300, 77, 150]
    table, nb = random_block_tables(lengths, BS)
    kv = torch.randn(nb, kv_heads, BS, 2 * dim).to(dtype)
    keys, values = kv[..., :dim], kv[..., dim:]
    k_scale, v_scale = torch.tensor(0.3), torch.tensor(0.7)
    order, lens = [2, 0, 1], [150, 300, 77]
    score_windows_triton(torch.randn(3, 8, q_heads, dim), keys, table, order, lens,
                         dim**-0.5, gqa_reduce="mean", pooling="max", pool_kernel=7,
                         k_scale=k_scale)
    voter_probs_triton(torch.randn(3, 4, q_heads, dim), keys, table, order, lens, dim**-0.5,
                       k_scale=k_scale)
    # The expected scorer's query moments: another chunk length, packing and rotary layout.
    packed = torch.randn(77, q_heads + 5, dim)
    unrotated_moments_triton(packed[:, 2 : 2 + q_heads], torch.arange(100, 177),
                             torch.rand(300, dim // 2), dim // 2, False)
    idx = torch.arange(3)
    rows = row_table(idx, idx + 1, idx, idx + 1, torch.tensor(lengths),
                     torch.tensor(lengths) + 1)
    pages = torch.zeros(5, kv_heads, dtype=torch.int32)
    counts = torch.full_like(pages, 40)
    query = torch.randn(3, q_heads, dim)
    for options in ({"num_splits": 1}, {"num_splits": 2}, {"balance_splits": 4}):
        headwise_attention_ranges_triton(query, keys, values, pages, counts, table, rows, 3,
                                         dim**-0.5, torch.empty_like(query), k_scale=k_scale,
                                         v_scale=v_scale, **options)


def _decode_event_other_batch(q_heads: int, kv_heads: int, dim: int, dtype: torch.dtype,
                              window: int) -> None:
    """A decode event (``--kv-decode-budget``) of three rows unlike the warm-up's one:
    other widths, tails and lengths, queries in the model's dtype (float32 here)."""
    from vllm_adakv.kernels.decode import row_table
    from vllm_adakv.kernels.triton_recompact import compact_decode_event_triton
    from vllm_adakv.kernels.triton_reselect import score_decode_event_triton

    lengths = [300, 177, 250]
    table, nb = random_block_tables(lengths, BS)
    kv = torch.randn(nb, kv_heads, BS, 2 * dim).to(dtype)
    keys, values = kv[..., :dim], kv[..., dim:]
    idx = torch.arange(3)
    tails = torch.tensor([n - window - 40 for n in lengths])
    rows = row_table(idx, idx, idx, idx, tails, torch.tensor(lengths))
    pages = (torch.arange(kv_heads, dtype=torch.int32) * 2).expand(3, -1).contiguous()
    counts = torch.full_like(pages, 20)
    width = 20 + 40 + 5
    score_decode_event_triton(torch.randn(3, window, q_heads, dim), keys, pages, counts,
                              table, rows, width, dim**-0.5, gqa_reduce="mean",
                              pooling="max", pool_kernel=7, k_scale=torch.tensor(0.3))
    keep = torch.zeros(3, kv_heads, width, dtype=torch.bool)
    keep[..., 3:30] = True
    compact_decode_event_triton(keys, values, pages, counts, table, rows, keep, window,
                                [2, 2, 2])


@pytest.mark.parametrize("cache_dtype", [None, torch.float8_e4m3fn], ids=["model", "fp8"])
@pytest.mark.parametrize("q_heads,kv_heads,dim", [(8, 2, 64)])
def test_warm_up_runs_every_kernel(q_heads, kv_heads, dim, cache_dtype):
    kw = dict(window=8, gqa_reduce="mean", pooling="max", pool_kernel=7, alpha=0.2,
              gvote_samples=3, cache_dtype=cache_dtype, decode_events=True)
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        seconds = warm_up(torch.device("cpu"), torch.float32, q_heads, kv_heads, dim, BS, **kw)
        assert seconds >= 0.0
        return
    from tests.kernels.sm90_compile import record_launches, variant

    with record_launches() as records:
        seconds = warm_up(torch.device("cpu"), torch.float32, q_heads, kv_heads, dim, BS, **kw)
    assert seconds >= 0.0
    warmed = {variant(r) for r in records}
    fp8 = {r["args"]["KV_FP8"]["constexpr"] for r in records if "KV_FP8" in r["args"]}
    assert fp8 == {cache_dtype is not None}
    cache = torch.float32 if cache_dtype is None else cache_dtype
    with record_launches() as records:
        _compact_other_batches(kv_heads, dim, cache)
    assert {r["kernel"] for r in records} == {"_page_ranges", "_gather_kept",
                                              "_scatter_pages", "_pooled_plan",
                                              "_pooled_step"}
    missing = sorted({r["kernel"] for r in records if variant(r) not in warmed})
    assert not missing, f"compaction variants the warm-up does not compile: {missing}"
    with record_launches() as records:
        _attend_other_batch(q_heads, kv_heads, dim, cache)
    assert {r["kernel"] for r in records} == {"_window_stats", "_candidate_scores",
                                              "_voter_probs", "_headwise_fwd",
                                              "_headwise_reduce", "_unrotated_partial_moments"}
    missing = sorted({r["kernel"] for r in records if variant(r) not in warmed})
    assert not missing, f"variants the warm-up does not compile: {missing}"
    with record_launches() as records:
        _decode_event_other_batch(q_heads, kv_heads, dim, cache, kw["window"])
    assert {r["kernel"] for r in records} == {"_event_stats", "_event_scores",
                                              "_gather_candidates", "_scatter_pages"}
    missing = sorted({r["kernel"] for r in records if variant(r) not in warmed})
    assert not missing, f"decode-event variants the warm-up does not compile: {missing}"
