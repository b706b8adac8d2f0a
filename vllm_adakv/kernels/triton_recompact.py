"""Compaction of one decode event (issue 29): Triton, all rows of a layer at once.

Same contract as ``compaction.compact_decode_event_reference``: each head's kept
candidates (its head-page tokens, then the tail positions ``[tail_start, S - w)``) move
into head-pages in block-table entries ``[0, P)`` of the row, heads in order, as the
prompt compaction lays them out; the window stays in the tail. Single-layer layout only.
Nothing here synchronises with the host:

1. torch: each kept candidate's rank within its (row, head) (an inclusive cumsum of the
   mask), the new counts, pages and first pages, and the checks (on CUDA
   ``torch._assert_async``; a bad row's mask is also cleared, so it writes nothing).
2. ``_gather_candidates``, grid ``(R * H, cdiv(width, BLOCK_T))``: each kept candidate
   (K and V), read where the head-wise decode reads it (a head-page through the old
   ``page_start``, or the tail through the block table), into the scratch slot it will
   occupy (row base + new ``page_start[h] * bs`` + rank - 1).
3. ``triton_compaction._scatter_pages`` (the prompt compaction's second launch): the
   scratch into the new head-pages. The gather-first order is what makes in place safe:
   the new pages overwrite old head-pages and tail blocks.

fp8 caches move as bytes (``kernels.fp8.as_bytes``). No vLLM import.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_adakv.kernels.compaction import check_decode_event
from vllm_adakv.kernels.fp8 import as_bytes
from vllm_adakv.kernels.jit import jit_unspecialized
from vllm_adakv.kernels.triton_compaction import _dst_table, _row_meta, _scatter_pages
from vllm_adakv.tensors import host_to_device, on_device

_BLOCK_T = 64
_CHECKS = ("the tail does not hold the window",
           "P blocks would overwrite the window's blocks (P > (S - w) // bs)",
           "the keep mask selects past a head's candidates",
           "the kept head-pages do not fit in P blocks",
           "the keep mask is narrower than a head's candidates")


@jit_unspecialized(ints=["width", "stride_rr", "stride_br", "stride_ps", "stride_psh",
                         "stride_cs", "stride_ch", "stride_mr", "stride_mh", "stride_ar",
                         "stride_ah"])
def _gather_candidates(
    k_ptr, v_ptr, bt_ptr, rows_ptr, ps_ptr, cnt_ptr, meta_ptr, start_ptr, mask_ptr,
    rank_ptr, scratch_ptr, width,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_rr, stride_br, stride_ps, stride_psh, stride_cs, stride_ch,
    stride_mr, stride_mh, stride_ar, stride_ah, stride_st, stride_sk,
    NUM_KV_HEADS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Kept candidates of (row, head) tile ``program_id(1)`` into the scratch."""
    r, head, slot0 = _row_meta(meta_ptr, start_ptr, NUM_KV_HEADS, BLOCK_SIZE)
    row = rows_ptr + r.to(tl.int64) * stride_rr
    bt_row = bt_ptr + tl.load(row).to(tl.int64) * stride_br
    slot = tl.load(row + 1).to(tl.int64)
    tail_start = tl.load(row + 4).to(tl.int64)
    old_first = tl.load(ps_ptr + slot * stride_ps + head * stride_psh).to(tl.int64)
    old_n = tl.load(cnt_ptr + slot * stride_cs + head * stride_ch).to(tl.int64)
    c = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    keep = tl.load(mask_ptr + r.to(tl.int64) * stride_mr + head * stride_mh + c,
                   mask=c < width, other=0) != 0
    rank = tl.load(rank_ptr + r.to(tl.int64) * stride_ar + head * stride_ah + c, mask=keep,
                   other=1).to(tl.int64) - 1
    c64 = c.to(tl.int64)
    paged = c64 < old_n
    entry = old_first + c64 // BLOCK_SIZE  # head-page entry (paged candidates)
    pos = tail_start + c64 - old_n  # position (tail candidates)
    idx = tl.where(paged, entry // NUM_KV_HEADS, pos // BLOCK_SIZE)
    blk = tl.load(bt_row + idx, mask=keep, other=0).to(tl.int64)
    src_slot = tl.where(paged, entry % NUM_KV_HEADS, head)
    off = tl.where(paged, c64 % BLOCK_SIZE, pos % BLOCK_SIZE)
    mask = keep[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(k_ptr + blk[:, None] * stride_kb + src_slot[:, None] * stride_kh
                + off[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=mask)
    v = tl.load(v_ptr + blk[:, None] * stride_vb + src_slot[:, None] * stride_vh
                + off[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=mask)
    dst = scratch_ptr + (slot0 + rank)[:, None] * stride_st + offs_d[None, :]
    tl.store(dst, k, mask=mask)
    tl.store(dst + stride_sk, v, mask=mask)


def _on(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """``t`` on ``dev`` (host tensors through pinned memory on CUDA: no host sync)."""
    return t if t.device == dev else host_to_device(t, dev)


def compact_decode_event_triton(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    page_start: torch.Tensor,
    kept_counts: torch.Tensor,
    block_table: torch.Tensor,
    rows: torch.Tensor,
    keep_mask: torch.Tensor,
    window: int,
    kept_blocks: list[int],
    *,
    chunk_base: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``compaction.compact_decode_event_reference``'s contract on the caches' device.

    Returns (page_start, counts) int32 ``[R, H]`` and tail_start int32 ``[R]``, on the
    device. Bad input raises ValueError off CUDA; on CUDA the device-side checks fail
    through ``torch._assert_async`` (and the bad rows write nothing). Nothing waits for
    the device on CUDA.
    """
    check_decode_event(page_start, kept_counts, block_table, rows, keep_mask, window,
                       kept_blocks, chunk_base)
    num_rows, heads, width = keep_mask.shape
    _, cache_heads, block_size, dim = key_cache.shape
    if cache_heads != heads or value_cache.shape != key_cache.shape:
        raise ValueError(f"caches {tuple(key_cache.shape)}/{tuple(value_cache.shape)} do "
                         f"not match a mask over {heads} heads")
    dev = key_cache.device
    key_cache, value_cache = as_bytes(key_cache), as_bytes(value_cache)
    rows_d = _on(rows, dev).to(torch.int32).contiguous()
    page_start, kept_counts = _on(page_start, dev), _on(kept_counts, dev)
    block_table = _on(block_table, dev)
    if block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    keep = _on(keep_mask, dev)
    bases = [0]
    for blocks in kept_blocks:
        bases.append(bases[-1] + blocks * heads)
    limit = on_device(kept_blocks, torch.int64, dev)
    meta = torch.stack([rows_d[:, 0].long(), limit,
                        on_device(bases[:-1], torch.int64, dev)], 1).contiguous()
    # Checks, on the device.
    seq_len, tail_start = rows_d[:, 5].long(), rows_d[:, 4].long()
    n_tail = seq_len - window - tail_start
    old_counts = kept_counts.index_select(0, rows_d[:, 1].long()).long()  # [R, H]
    cand = torch.arange(width, device=dev)
    num_cand = old_counts + n_tail[:, None]  # [R, H]
    beyond = (keep & (cand >= num_cand[..., None])).flatten(1).any(1)
    counts = keep.sum(2)
    pages = (counts + block_size - 1) // block_size
    bad = torch.stack([(tail_start < 0) | (n_tail < 0),
                       limit > (seq_len - window).div(block_size, rounding_mode="floor"),
                       beyond, pages.sum(1) > limit * heads,
                       (num_cand > width).any(1)], 1)  # [R, checks]
    if dev.type == "cuda":
        torch._assert_async(~bad.any())
    elif bool(bad.any()):
        r, check = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"row {r}: {_CHECKS[check]}")
    good = ~bad.any(1)
    keep = (keep & good[:, None, None]).contiguous()
    counts = torch.where(good[:, None], counts, 0)
    pages = torch.where(good[:, None], pages, 0)
    new_start = (torch.cumsum(pages, 1) - pages).to(torch.int32).contiguous()
    counts = counts.to(torch.int32).contiguous()
    tails = (seq_len - window).to(torch.int32)
    if num_rows == 0 or width == 0:
        return new_start, counts, tails
    ranks = torch.cumsum(keep, dim=2, dtype=torch.int32)
    mask_u8 = keep.view(torch.uint8)
    scratch = torch.empty(max(bases[-1], 1) * block_size, 2, dim, dtype=key_cache.dtype,
                          device=dev)
    block_d = max(16, triton.next_power_of_2(dim))
    grid = (num_rows * heads, triton.cdiv(width, _BLOCK_T))
    common = dict(NUM_KV_HEADS=heads, BLOCK_SIZE=block_size, HEAD_DIM=dim, BLOCK_T=_BLOCK_T,
                  BLOCK_D=block_d)
    _gather_candidates[grid](
        key_cache, value_cache, block_table, rows_d, page_start, kept_counts, meta, new_start,
        mask_u8, ranks, scratch, width, *key_cache.stride(), *value_cache.stride(),
        rows_d.stride(0), block_table.stride(0), page_start.stride(0), page_start.stride(1),
        kept_counts.stride(0), kept_counts.stride(1), mask_u8.stride(0), mask_u8.stride(1),
        ranks.stride(0), ranks.stride(1), scratch.stride(0), scratch.stride(1), **common,
    )
    dst = _dst_table(block_table, meta, None, num_rows, dev)
    _scatter_pages[grid](
        key_cache, value_cache, dst, meta, new_start, counts, scratch,
        *key_cache.stride(), *value_cache.stride(), dst.stride(0),
        scratch.stride(0), scratch.stride(1), **common,
    )
    return new_start, counts, tails
