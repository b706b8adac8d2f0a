"""Compaction: Triton kernels with ``compaction.compact_ranges_reference``'s contract.

Nothing here synchronises with the host (the reference needs ``nonzero``):

1. torch: kept tokens per head, pages per head, each head's first page
   (exclusive cumsum) and, per head, the kept positions first in position
   order (a stable sort of the inverted mask).
2. ``_gather_kept``, grid ``(H, cdiv(L, BLOCK_T))``: the i-th kept token of
   head h (K and V) into a scratch buffer ``[H, L, 2, D]``.
3. ``_scatter_pages``, grid ``(H, cdiv(L, BLOCK_T))``: scratch row (h, i) into
   head-page ``page_start[h] + i // bs`` of the request's head-page sequence
   (entry j = block ``block_ids[j // H]``, slot ``j % H``), offset ``i % bs``.
Sources and destinations overlap (the first blocks), hence the scratch and
two launches. That the pages fit in ``kept_blocks`` blocks is checked on the
device (``torch._assert_async``): the memory plan guarantees it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_kept(
    k_ptr, v_ptr, bid_ptr, order_ptr, cnt_ptr, scratch_ptr,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_oh, stride_sh, stride_st, stride_sk,
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
    pos = tl.load(order_ptr + head * stride_oh + offs_t, mask=valid, other=0)
    blk = tl.load(bid_ptr + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    off = (pos % BLOCK_SIZE).to(tl.int64)
    k = tl.load(k_ptr + blk[:, None] * stride_kb + head * stride_kh + off[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=mask)
    v = tl.load(v_ptr + blk[:, None] * stride_vb + head * stride_vh + off[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=mask)
    row = offs_t[:, None].to(tl.int64) * stride_st
    dst = scratch_ptr + head * stride_sh + row + offs_d[None, :]
    tl.store(dst, k, mask=mask)
    tl.store(dst + stride_sk, v, mask=mask)


@triton.jit
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
    counts = keep_mask.sum(dim=1, dtype=torch.int32)
    pages = (counts + block_size - 1) // block_size
    page_start = (torch.cumsum(pages, 0, dtype=torch.int32) - pages).contiguous()
    if dev.type == "cuda":
        torch._assert_async(pages.sum() <= kept_blocks * heads)
    elif int(pages.sum()) > kept_blocks * heads:
        raise RuntimeError(f"compaction needs {int(pages.sum())} head-pages but only "
                           f"{kept_blocks * heads} are reserved")
    # Kept positions first, each head's in position order (stable sort of "dropped").
    order = torch.sort((~keep_mask).to(torch.uint8), dim=1, stable=True).indices
    order = order.to(torch.int32).contiguous()
    scratch = torch.empty(heads, length, 2, dim, dtype=key_cache.dtype, device=dev)
    block_t = 64
    block_d = max(16, triton.next_power_of_2(dim))
    grid = (heads, triton.cdiv(length, block_t))
    _gather_kept[grid](
        key_cache, value_cache, block_ids, order, counts, scratch,
        *key_cache.stride(), *value_cache.stride(), order.stride(0),
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
