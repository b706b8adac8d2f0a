"""Compaction: Triton kernels with ``compaction.compact_ranges_reference``'s contract.

Nothing here synchronises with the host (the reference needs ``nonzero``):

1. torch: each kept position's rank within its head, an inclusive cumsum of the
   mask (kept positions stay in position order).
2. ``_page_ranges``, one program: kept tokens per head (the last rank), pages
   per head and each head's first page (exclusive cumsum), and the number of
   head-pages beyond the ``kept_blocks`` blocks the memory plan reserved
   (checked on the device with ``torch._assert_async``: the plan guarantees 0).
3. ``_gather_kept``, grid ``(H, cdiv(L, BLOCK_T))``: each kept token (K and V) of
   head h into row (h, rank - 1) of a scratch buffer ``[H, L, 2, D]``.
4. ``_scatter_pages``, grid ``(H, cdiv(L, BLOCK_T))``: scratch row (h, i) into
   head-page ``page_start[h] + i // bs`` of the request's head-page sequence
   (entry j = block ``block_ids[j // H]``, slot ``j % H``), offset ``i % bs``.
Sources and destinations overlap (the first blocks), hence the scratch and
two launches. Lengths and strides that vary per request are not specialised on.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_adakv.kernels.jit import jit_unspecialized


@jit_unspecialized(ints=["length", "stride_rh", "capacity"])
def _page_ranges(rank_ptr, cnt_ptr, start_ptr, over_ptr, length, stride_rh, capacity,
                 NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < NUM_KV_HEADS
    counts = tl.load(rank_ptr + offs_h * stride_rh + (length - 1), mask=mask_h, other=0)
    pages = (counts + BLOCK_SIZE - 1) // BLOCK_SIZE
    start = tl.cumsum(pages, 0) - pages
    tl.store(cnt_ptr + offs_h, counts.to(tl.int32), mask=mask_h)
    tl.store(start_ptr + offs_h, start.to(tl.int32), mask=mask_h)
    tl.store(over_ptr, tl.maximum(tl.sum(pages, 0) - capacity, 0).to(tl.int32))


@jit_unspecialized(ints=["length", "stride_mh", "stride_rh", "stride_sh"],
                   pointers=["bid_ptr"])
def _gather_kept(
    k_ptr, v_ptr, bid_ptr, mask_ptr, rank_ptr, scratch_ptr, length,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mh, stride_rh, stride_sh, stride_st, stride_sk,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    head = tl.program_id(0)
    pos = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    in_prompt = pos < length
    keep = tl.load(mask_ptr + head * stride_mh + pos, mask=in_prompt, other=0) != 0
    rank = tl.load(rank_ptr + head * stride_rh + pos, mask=keep, other=1) - 1
    mask = keep[:, None] & (offs_d < HEAD_DIM)[None, :]
    blk = tl.load(bid_ptr + pos // BLOCK_SIZE, mask=keep, other=0).to(tl.int64)
    off = (pos % BLOCK_SIZE).to(tl.int64)
    k = tl.load(k_ptr + blk[:, None] * stride_kb + head * stride_kh + off[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=mask)
    v = tl.load(v_ptr + blk[:, None] * stride_vb + head * stride_vh + off[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=mask)
    row = rank[:, None].to(tl.int64) * stride_st
    dst = scratch_ptr + head * stride_sh + row + offs_d[None, :]
    tl.store(dst, k, mask=mask)
    tl.store(dst + stride_sk, v, mask=mask)


@jit_unspecialized(ints=["stride_sh"], pointers=["bid_ptr"])
def _scatter_pages(
    k_ptr, v_ptr, bid_ptr, start_ptr, cnt_ptr, scratch_ptr,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_sh, stride_st, stride_sk,
    NUM_KV_HEADS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    head = tl.program_id(0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    count = tl.load(cnt_ptr + head)
    valid = offs_t < count
    mask = valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    seq = tl.load(start_ptr + head).to(tl.int64) + offs_t // BLOCK_SIZE
    blk = tl.load(bid_ptr + seq // NUM_KV_HEADS, mask=valid, other=0).to(tl.int64)
    slot = seq % NUM_KV_HEADS
    off = (offs_t % BLOCK_SIZE).to(tl.int64)
    row = offs_t[:, None].to(tl.int64) * stride_st
    src = scratch_ptr + head * stride_sh + row + offs_d[None, :]
    k = tl.load(src, mask=mask)
    v = tl.load(src + stride_sk, mask=mask)
    tl.store(k_ptr + blk[:, None] * stride_kb + slot[:, None] * stride_kh
             + off[:, None] * stride_kn + offs_d[None, :] * stride_kd, k, mask=mask)
    tl.store(v_ptr + blk[:, None] * stride_vb + slot[:, None] * stride_vh
             + off[:, None] * stride_vn + offs_d[None, :] * stride_vd, v, mask=mask)


def compact_ranges_triton(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_ids: torch.Tensor,
    keep_mask: torch.Tensor,
    kept_blocks: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact one request's kept tokens of one layer in place; see the reference."""
    heads, length = keep_mask.shape
    _, cache_heads, block_size, dim = key_cache.shape
    assert cache_heads == heads and value_cache.shape == key_cache.shape
    dev = key_cache.device
    block_ids = block_ids.to(dev)
    keep_mask = keep_mask.contiguous()
    # Rank of each kept position within its head (1-based; kept positions stay in order).
    ranks = torch.cumsum(keep_mask, dim=1, dtype=torch.int32)
    counts = torch.empty(heads, dtype=torch.int32, device=dev)
    page_start = torch.empty_like(counts)
    over = torch.empty(1, dtype=torch.int32, device=dev)
    _page_ranges[(1,)](ranks, counts, page_start, over, length, ranks.stride(0),
                       kept_blocks * heads, NUM_KV_HEADS=heads, BLOCK_SIZE=block_size,
                       BLOCK_H=triton.next_power_of_2(heads))
    if dev.type == "cuda":
        torch._assert_async(over[0] == 0)
    elif int(over[0]) > 0:
        raise RuntimeError(f"compaction needs {int(over[0])} head-pages more than the "
                           f"{kept_blocks * heads} that are reserved")
    mask_u8 = keep_mask.view(torch.uint8) if keep_mask.dtype == torch.bool else keep_mask
    scratch = torch.empty(heads, length, 2, dim, dtype=key_cache.dtype, device=dev)
    block_t = 64
    block_d = max(16, triton.next_power_of_2(dim))
    grid = (heads, triton.cdiv(length, block_t))
    _gather_kept[grid](
        key_cache, value_cache, block_ids, mask_u8, ranks, scratch, length,
        *key_cache.stride(), *value_cache.stride(), mask_u8.stride(0), ranks.stride(0),
        scratch.stride(0), scratch.stride(1), scratch.stride(2),
        BLOCK_SIZE=block_size, HEAD_DIM=dim, BLOCK_T=block_t, BLOCK_D=block_d,
    )
    _scatter_pages[grid](
        key_cache, value_cache, block_ids, page_start, counts, scratch,
        *key_cache.stride(), *value_cache.stride(),
        scratch.stride(0), scratch.stride(1), scratch.stride(2),
        NUM_KV_HEADS=heads, BLOCK_SIZE=block_size, HEAD_DIM=dim, BLOCK_T=block_t,
        BLOCK_D=block_d,
    )
    return page_start, counts
