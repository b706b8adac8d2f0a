"""Compaction: Triton kernels for all requests of a layer at once.

Same contract as ``compaction.compact_rows_reference``. Nothing here synchronises
with the host (the reference needs ``nonzero``):

1. torch: each kept position's rank within its (request, head), an inclusive
   cumsum of the masks (kept positions stay in position order).
2. ``_page_ranges``, grid ``(R,)``: kept tokens per head (the last rank), pages
   per head and each head's first page (exclusive cumsum), and the head-pages
   beyond the ``kept_blocks`` blocks the memory plan reserved for the request
   (checked on the device with ``torch._assert_async``: the plan guarantees 0).
3. ``_gather_kept``, grid ``(R * H, cdiv(Lmax, BLOCK_T))``: each kept token (K and
   V) of head h into the scratch slot it will occupy in the head-page sequence
   (request base + ``page_start[h] * bs`` + rank - 1): the scratch holds only
   the reserved capacity, ``kept_blocks * H * bs`` tokens per request.
4. ``_scatter_pages``, same grid: scratch slot (h, i) into head-page
   ``page_start[h] + i // bs`` of the request's head-page sequence (entry j =
   block ``block_ids[j // H]``, slot ``j % H``), offset ``i % bs``.
Sources and destinations overlap (the first blocks), hence the scratch and
two launches. Lengths and strides that vary per step are not specialised on.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_adakv.kernels.jit import jit_unspecialized
from vllm_adakv.tensors import on_device


@jit_unspecialized(ints=["width", "stride_rr", "stride_rh"])
def _page_ranges(rank_ptr, meta_ptr, cnt_ptr, start_ptr, over_ptr, width, stride_rr,
                 stride_rh, NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    r = tl.program_id(0)
    capacity = tl.load(meta_ptr + 3 * r + 1).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < NUM_KV_HEADS
    counts = tl.load(rank_ptr + r.to(tl.int64) * stride_rr + offs_h * stride_rh + (width - 1),
                     mask=mask_h, other=0).to(tl.int64)
    pages = (counts + BLOCK_SIZE - 1) // BLOCK_SIZE
    start = tl.cumsum(pages, 0) - pages
    tl.store(cnt_ptr + r * NUM_KV_HEADS + offs_h, counts.to(tl.int32), mask=mask_h)
    tl.store(start_ptr + r * NUM_KV_HEADS + offs_h, start.to(tl.int32), mask=mask_h)
    tl.store(over_ptr + r, tl.maximum(tl.sum(pages, 0) - capacity * NUM_KV_HEADS, 0).to(tl.int32))


@triton.jit
def _row_meta(meta_ptr, bt_ptr, stride_br, start_ptr, NUM_KV_HEADS: tl.constexpr,
              BLOCK_SIZE: tl.constexpr):
    """Request row and head of this program, the row's block ids, and the scratch slot of
    the head's first kept token."""
    r = tl.program_id(0) // NUM_KV_HEADS
    head = tl.program_id(0) % NUM_KV_HEADS
    block_row = tl.load(meta_ptr + 3 * r).to(tl.int64)
    base = tl.load(meta_ptr + 3 * r + 2).to(tl.int64) * BLOCK_SIZE
    first = tl.load(start_ptr + r * NUM_KV_HEADS + head).to(tl.int64)
    return r, head, bt_ptr + block_row * stride_br, base + first * BLOCK_SIZE


@jit_unspecialized(ints=["width", "stride_br", "stride_mr", "stride_mh", "stride_rr",
                         "stride_rh"])
def _gather_kept(
    k_ptr, v_ptr, bt_ptr, meta_ptr, start_ptr, mask_ptr, rank_ptr, scratch_ptr, width,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_br, stride_mr, stride_mh, stride_rr, stride_rh, stride_st, stride_sk,
    NUM_KV_HEADS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r, head, bid_ptr, slot0 = _row_meta(meta_ptr, bt_ptr, stride_br, start_ptr, NUM_KV_HEADS,
                                        BLOCK_SIZE)
    pos = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    row = r.to(tl.int64) * stride_mr + head * stride_mh
    keep = tl.load(mask_ptr + row + pos, mask=pos < width, other=0) != 0
    rank = tl.load(rank_ptr + r.to(tl.int64) * stride_rr + head * stride_rh + pos, mask=keep,
                   other=1) - 1
    mask = keep[:, None] & (offs_d < HEAD_DIM)[None, :]
    blk = tl.load(bid_ptr + pos // BLOCK_SIZE, mask=keep, other=0).to(tl.int64)
    off = (pos % BLOCK_SIZE).to(tl.int64)
    k = tl.load(k_ptr + blk[:, None] * stride_kb + head * stride_kh + off[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=mask)
    v = tl.load(v_ptr + blk[:, None] * stride_vb + head * stride_vh + off[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=mask)
    dst = scratch_ptr + (slot0 + rank.to(tl.int64))[:, None] * stride_st + offs_d[None, :]
    tl.store(dst, k, mask=mask)
    tl.store(dst + stride_sk, v, mask=mask)


@jit_unspecialized(ints=["stride_br"])
def _scatter_pages(
    k_ptr, v_ptr, bt_ptr, meta_ptr, start_ptr, cnt_ptr, scratch_ptr,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_br, stride_st, stride_sk,
    NUM_KV_HEADS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r, head, bid_ptr, slot0 = _row_meta(meta_ptr, bt_ptr, stride_br, start_ptr, NUM_KV_HEADS,
                                        BLOCK_SIZE)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    count = tl.load(cnt_ptr + r * NUM_KV_HEADS + head)
    valid = offs_t < count
    mask = valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    seq = tl.load(start_ptr + r * NUM_KV_HEADS + head).to(tl.int64) + offs_t // BLOCK_SIZE
    blk = tl.load(bid_ptr + seq // NUM_KV_HEADS, mask=valid, other=0).to(tl.int64)
    slot = seq % NUM_KV_HEADS
    off = (offs_t % BLOCK_SIZE).to(tl.int64)
    src = scratch_ptr + (slot0 + offs_t.to(tl.int64))[:, None] * stride_st + offs_d[None, :]
    k = tl.load(src, mask=mask)
    v = tl.load(src + stride_sk, mask=mask)
    tl.store(k_ptr + blk[:, None] * stride_kb + slot[:, None] * stride_kh
             + off[:, None] * stride_kn + offs_d[None, :] * stride_kd, k, mask=mask)
    tl.store(v_ptr + blk[:, None] * stride_vb + slot[:, None] * stride_vh
             + off[:, None] * stride_vn + offs_d[None, :] * stride_vd, v, mask=mask)


def compact_rows_triton(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    block_rows: list[int],
    keep_masks: torch.Tensor,
    kept_blocks: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact ``R`` requests' kept tokens of one layer in place; see the reference."""
    rows, heads, width = keep_masks.shape
    _, cache_heads, block_size, dim = key_cache.shape
    assert cache_heads == heads and value_cache.shape == key_cache.shape
    assert len(block_rows) == len(kept_blocks) == rows
    dev = key_cache.device
    block_table = block_table.to(dev)
    keep_masks = keep_masks.contiguous()
    # Per row: block-table row, reserved blocks, first scratch page (capacities in order).
    bases = [0]
    for blocks in kept_blocks:
        bases.append(bases[-1] + blocks * heads)
    meta = on_device([[b, k, base] for b, k, base in zip(block_rows, kept_blocks, bases,
                                                        strict=False)], torch.int64, dev)
    # Rank of each kept position within its head (1-based; kept positions stay in order).
    ranks = torch.cumsum(keep_masks, dim=2, dtype=torch.int32)
    counts = torch.empty(rows, heads, dtype=torch.int32, device=dev)
    page_start = torch.empty_like(counts)
    over = torch.empty(rows, dtype=torch.int32, device=dev)
    _page_ranges[(rows,)](ranks, meta, counts, page_start, over, width, ranks.stride(0),
                          ranks.stride(1), NUM_KV_HEADS=heads, BLOCK_SIZE=block_size,
                          BLOCK_H=triton.next_power_of_2(heads))
    if dev.type == "cuda":
        torch._assert_async(over.max() == 0)
    elif int(over.max()) > 0:
        raise RuntimeError(f"compaction needs {int(over.max())} head-pages more than a "
                           f"request's reserved blocks hold ({kept_blocks} blocks)")
    masks_u8 = keep_masks.view(torch.uint8)
    scratch = torch.empty(bases[-1] * block_size, 2, dim, dtype=key_cache.dtype, device=dev)
    block_t = 64
    block_d = max(16, triton.next_power_of_2(dim))
    grid = (rows * heads, triton.cdiv(width, block_t))
    common = dict(NUM_KV_HEADS=heads, BLOCK_SIZE=block_size, HEAD_DIM=dim, BLOCK_T=block_t,
                  BLOCK_D=block_d)
    _gather_kept[grid](
        key_cache, value_cache, block_table, meta, page_start, masks_u8, ranks, scratch, width,
        *key_cache.stride(), *value_cache.stride(), block_table.stride(0),
        masks_u8.stride(0), masks_u8.stride(1), ranks.stride(0), ranks.stride(1),
        scratch.stride(0), scratch.stride(1), **common,
    )
    _scatter_pages[grid](
        key_cache, value_cache, block_table, meta, page_start, counts, scratch,
        *key_cache.stride(), *value_cache.stride(), block_table.stride(0),
        scratch.stride(0), scratch.stride(1), **common,
    )
    return page_start, counts


def compact_ranges_triton(key_cache: torch.Tensor, value_cache: torch.Tensor,
                          block_ids: torch.Tensor, keep_mask: torch.Tensor, kept_blocks: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact one request's kept tokens of one layer in place; contract of
    ``compaction.compact_ranges_reference``."""
    page_start, counts = compact_rows_triton(key_cache, value_cache, block_ids[None], [0],
                                             keep_mask[None], [kept_blocks])
    return page_start[0], counts[0]
