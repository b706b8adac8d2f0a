"""Compaction: Triton kernels for all requests of a layer at once.

Same contract as ``compaction.compact_rows_reference``: kept tokens are read from each
request's block table row and written into the head-page sequence of its destination
blocks. The kernels always read destinations from a ``[R, W]`` int32 destination table
(row r: request r), ``dst_blocks`` or, by default (in place), the requests' block table
rows gathered on the device (``_dst_table``); both cases launch the same compiled
variants (the table's row stride and alignment are not specialised on). Given
destinations must hold no source block of the launch (of any of its requests); in place
is the other case handled. Nothing here synchronises with the host (the reference needs
``nonzero``):

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
   block ``dst[r, j // H]``, slot ``j % H``), offset ``i % bs``.
In place, sources and destinations overlap (the first blocks), hence the scratch and
two launches (destinations apart take the same path). Lengths and strides that vary
per step are not specialised on.

``compact_pooled_rows_triton`` compacts all K layers of a group at once, head-pages
pooled across the layers' tensors (``compaction.compact_pooled_rows_reference``): the
same rank cumsum over ``[R, K, H, Lmax]``; ``_pooled_plan`` (grid ``(R,)``) computes
the counts, the layers' stable ascending order of pages (chunk k of the pooled
sequence = tensor of layer ``chunk_layer[k]``), each head's first entry, the blocks
kept per layer tensor and the blocks needed (checked on the device as above); then K
passes, pass i compacting in every row the layer placed in chunk i: a gather (kept
tokens bound for earlier chunks written directly, those of its own chunk staged in a
scratch) and a scatter (scratch into its own chunk), pass i's scatter sharing one
launch (``_pooled_step``) with pass i + 1's gather: K + 1 launches in all, with two
scratch halves (or, where those would exceed ``_FUSED_SCRATCH_BYTES``, one half and 2K
launches; same compiled variants). Chunk k lies at blocks ``layer_bases[chunk_layer[k]]
+ dst[r, :]``, destinations from the destination table as above. The pass order and
the scratch are what make in place safe; destinations apart from the sources take the
same path.

fp8 caches are compacted through uint8 views (``kernels.fp8.as_bytes``): the kernels move
bytes, one compiled variant for every fp8 format.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_adakv.kernels.fp8 import as_bytes
from vllm_adakv.kernels.jit import jit_unspecialized
from vllm_adakv.tensors import host_to_device, on_device


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
def _row_meta(meta_ptr, start_ptr, NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Request row and head of this program, and the scratch slot of the head's first kept
    token."""
    r = tl.program_id(0) // NUM_KV_HEADS
    head = tl.program_id(0) % NUM_KV_HEADS
    base = tl.load(meta_ptr + 3 * r + 2).to(tl.int64) * BLOCK_SIZE
    first = tl.load(start_ptr + r * NUM_KV_HEADS + head).to(tl.int64)
    return r, head, base + first * BLOCK_SIZE


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
    r, head, slot0 = _row_meta(meta_ptr, start_ptr, NUM_KV_HEADS, BLOCK_SIZE)
    bid_ptr = bt_ptr + tl.load(meta_ptr + 3 * r).to(tl.int64) * stride_br  # sources
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


@jit_unspecialized(ints=["stride_dr"], pointers=["dst_ptr"])
def _scatter_pages(
    k_ptr, v_ptr, dst_ptr, meta_ptr, start_ptr, cnt_ptr, scratch_ptr,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dr, stride_st, stride_sk,
    NUM_KV_HEADS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r, head, slot0 = _row_meta(meta_ptr, start_ptr, NUM_KV_HEADS, BLOCK_SIZE)
    dst_row = dst_ptr + r.to(tl.int64) * stride_dr  # the row's destination blocks
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    count = tl.load(cnt_ptr + r * NUM_KV_HEADS + head)
    valid = offs_t < count
    mask = valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    seq = tl.load(start_ptr + r * NUM_KV_HEADS + head).to(tl.int64) + offs_t // BLOCK_SIZE
    blk = tl.load(dst_row + seq // NUM_KV_HEADS, mask=valid, other=0).to(tl.int64)
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
    dst_blocks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact ``R`` requests' kept tokens of one layer; contract of
    ``compaction.compact_rows_reference``.

    dst_blocks: ``[R, W]`` integer destination ids (device or host; row r for request r,
    ``W >= max(kept_blocks)``), none of them a source block of any row; None: in place.
    Returns (page_start, counts), int32 ``[R, H]`` on the device. Nothing waits for the
    device on CUDA.
    """
    rows, heads, width = keep_masks.shape
    _, cache_heads, block_size, dim = key_cache.shape
    assert cache_heads == heads and value_cache.shape == key_cache.shape
    assert len(block_rows) == len(kept_blocks) == rows
    dev = key_cache.device
    key_cache, value_cache = as_bytes(key_cache), as_bytes(value_cache)
    block_table = block_table.to(dev)
    keep_masks = keep_masks.contiguous()
    # Per row: block-table row, reserved blocks, first scratch page (capacities in order).
    bases = [0]
    for blocks in kept_blocks:
        bases.append(bases[-1] + blocks * heads)
    meta = on_device([[b, k, base] for b, k, base in zip(block_rows, kept_blocks, bases,
                                                        strict=False)], torch.int64, dev)
    dst = _dst_table(block_table, meta, dst_blocks, rows, dev)
    if dst_blocks is not None and rows and max(kept_blocks) > dst.shape[1]:
        raise RuntimeError(f"compaction needs up to {max(kept_blocks)} destination blocks "
                           f"per row but dst_blocks has {dst.shape[1]}")
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
        key_cache, value_cache, dst, meta, page_start, counts, scratch,
        *key_cache.stride(), *value_cache.stride(), dst.stride(0),
        scratch.stride(0), scratch.stride(1), **common,
    )
    return page_start, counts


def _dst_table(block_table: torch.Tensor, meta: torch.Tensor,
               dst_blocks: torch.Tensor | None, rows: int, dev: torch.device) -> torch.Tensor:
    """The launch's destination table: ``[R, W]`` int32 on ``dev``, unit column stride.
    ``dst_blocks`` (uploaded through pinned memory if on the host), or, in place, the
    rows' own block table rows (``meta[:, 0]``) gathered on the device: no host sync."""
    if dst_blocks is None:
        dst = block_table.index_select(0, meta.view(-1, 3)[:, 0])
    else:
        if dst_blocks.dim() != 2 or dst_blocks.shape[0] != rows:
            raise RuntimeError(f"dst_blocks must be [R={rows}, W], got "
                               f"{tuple(dst_blocks.shape)}")
        dst = dst_blocks
        if dst.device != dev:
            dst = host_to_device(dst.to(torch.int32), dev)
    dst = dst.to(torch.int32)
    return dst if dst.stride(1) == 1 else dst.contiguous()


# Head-pages pooled across the layers of a group (``compaction.compact_pooled_reference``).
# The plan kernel tiles the layers in BLOCK_K >= _PLAN_MIN_LAYERS: one compiled variant
# serves every group of up to that many layers (the warm-up compiles it with two).
_PLAN_MIN_LAYERS = 64


# Scratch of the fused pass launches (two halves) at most this large, else unfused.
_FUSED_SCRATCH_BYTES = 64 << 20


def plan_block_layers(num_layers: int) -> int:
    """The plan kernel's layer tile for ``num_layers`` layers (a compile-time constant)."""
    return max(_PLAN_MIN_LAYERS, triton.next_power_of_2(num_layers))


@jit_unspecialized(ints=["num_layers", "width", "stride_rr", "stride_rk", "stride_rh"])
def _pooled_plan(rank_ptr, meta_ptr, cnt_ptr, start_ptr, chunk_ptr, kb_ptr, need_ptr,
                 num_layers, width, stride_rr, stride_rk, stride_rh,
                 NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    """Per request row: counts and pages per (layer, head), the layers' stable ascending
    order of pages (chunk_layer), each head's first entry, and the blocks kept per layer
    tensor (the plan's, or the fewest that hold the pages) with the blocks needed."""
    r = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, BLOCK_K)
    offs_h = tl.arange(0, BLOCK_H)
    mask_k = offs_k < num_layers
    mask_kh = mask_k[:, None] & (offs_h < NUM_KV_HEADS)[None, :]
    counts = tl.load(rank_ptr + r.to(tl.int64) * stride_rr + offs_k[:, None] * stride_rk
                     + offs_h[None, :] * stride_rh + (width - 1), mask=mask_kh,
                     other=0).to(tl.int64)
    pages = (counts + BLOCK_SIZE - 1) // BLOCK_SIZE  # [BK, BH]
    layer_pages = tl.sum(pages, 1)  # [BK]
    # Layer j comes before layer k: fewer pages, or as many and j < k (a stable sort).
    p_k = layer_pages[:, None]
    p_j = layer_pages[None, :]
    before = ((p_j < p_k) | ((p_j == p_k) & (offs_j[None, :] < offs_k[:, None]))) \
        & (offs_j < num_layers)[None, :]
    position = tl.sum(before.to(tl.int64), 1)  # chunk of layer k
    layer_start = tl.sum(tl.where(before, p_j, 0), 1)
    head_start = tl.cumsum(pages, 1) - pages
    start = layer_start[:, None] + head_start
    total = tl.sum(layer_pages, 0)
    per_chunk = num_layers * NUM_KV_HEADS
    need = tl.maximum((total + per_chunk - 1) // per_chunk, 1)
    given = tl.load(meta_ptr + 3 * r + 1)
    kept = tl.where(given < 0, need, given)
    out = r * num_layers * NUM_KV_HEADS + offs_k[:, None] * NUM_KV_HEADS + offs_h[None, :]
    tl.store(cnt_ptr + out, counts.to(tl.int32), mask=mask_kh)
    tl.store(start_ptr + out, start.to(tl.int32), mask=mask_kh)
    tl.store(chunk_ptr + r * num_layers + position, offs_k.to(tl.int32), mask=mask_k)
    tl.store(kb_ptr + r, kept.to(tl.int32))
    tl.store(need_ptr + r, need.to(tl.int32))


@triton.jit
def _pass_meta(meta_ptr, bt_ptr, stride_br, dst_ptr, stride_dr, chunk_ptr, lb_ptr, kb_ptr,
               pass_idx, num_layers, NUM_KV_HEADS: tl.constexpr):
    """Request row, head, layer (chunk ``pass_idx``'s) of this program; the row's source
    block ids (block table row) and destination block ids (destination table row r), the
    layer's block offset, the chunk capacity and the row's first scratch entry."""
    r = tl.program_id(0) // NUM_KV_HEADS
    head = tl.program_id(0) % NUM_KV_HEADS
    block_row = tl.load(meta_ptr + 3 * r).to(tl.int64)
    scratch0 = tl.load(meta_ptr + 3 * r + 2).to(tl.int64)
    layer = tl.load(chunk_ptr + r * num_layers + pass_idx).to(tl.int64)
    layer_base = tl.load(lb_ptr + layer).to(tl.int64)
    capacity = tl.maximum(tl.load(kb_ptr + r).to(tl.int64), 1) * NUM_KV_HEADS
    return (r, head, layer, bt_ptr + block_row * stride_br,
            dst_ptr + r.to(tl.int64) * stride_dr, layer_base, capacity, scratch0)


@triton.jit
def _pooled_gather(
    k_ptr, v_ptr, bt_ptr, dst_ptr, meta_ptr, lb_ptr, chunk_ptr, kb_ptr, start_ptr, mask_ptr,
    rank_ptr, scratch_ptr, pass_idx, tile, num_layers, width,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_br, stride_dr, stride_mr, stride_mk, stride_mh, stride_rr, stride_rk, stride_rh,
    stride_st, stride_sk,
    NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Pass ``pass_idx``: the kept tokens of head h of the layer placed in that chunk.
    Entries in earlier chunks (in place: tensors of layers already compacted, no source
    of this pass) are written directly; entries in the layer's own chunk go to the
    scratch."""
    r, head, layer, bid_ptr, dst_row, layer_base, capacity, scratch0 = _pass_meta(
        meta_ptr, bt_ptr, stride_br, dst_ptr, stride_dr, chunk_ptr, lb_ptr, kb_ptr, pass_idx,
        num_layers, NUM_KV_HEADS)
    pos = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = (offs_d < HEAD_DIM)[None, :]
    row = r.to(tl.int64) * stride_mr + layer * stride_mk + head * stride_mh
    keep = tl.load(mask_ptr + row + pos, mask=pos < width, other=0) != 0
    rank = tl.load(rank_ptr + r.to(tl.int64) * stride_rr + layer * stride_rk
                   + head * stride_rh + pos, mask=keep, other=1) - 1
    blk = layer_base + tl.load(bid_ptr + pos // BLOCK_SIZE, mask=keep, other=0).to(tl.int64)
    off = (pos % BLOCK_SIZE).to(tl.int64)
    mask = keep[:, None] & mask_d
    k = tl.load(k_ptr + blk[:, None] * stride_kb + head * stride_kh + off[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=mask)
    v = tl.load(v_ptr + blk[:, None] * stride_vb + head * stride_vh + off[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=mask)
    first = tl.load(start_ptr + (r * num_layers + layer) * NUM_KV_HEADS + head).to(tl.int64)
    rank = rank.to(tl.int64)
    entry = first + rank // BLOCK_SIZE
    chunk = entry // capacity
    local = entry - chunk * capacity
    dst_off = rank % BLOCK_SIZE
    direct = keep & (chunk < pass_idx)
    staged = keep & (chunk == pass_idx)
    dst_layer = tl.load(chunk_ptr + r * num_layers + chunk, mask=direct, other=0).to(tl.int64)
    dst_blk = tl.load(lb_ptr + dst_layer, mask=direct, other=0).to(tl.int64) \
        + tl.load(dst_row + local // NUM_KV_HEADS, mask=direct, other=0).to(tl.int64)
    dst_slot = local % NUM_KV_HEADS
    dmask = direct[:, None] & mask_d
    tl.store(k_ptr + dst_blk[:, None] * stride_kb + dst_slot[:, None] * stride_kh
             + dst_off[:, None] * stride_kn + offs_d[None, :] * stride_kd, k, mask=dmask)
    tl.store(v_ptr + dst_blk[:, None] * stride_vb + dst_slot[:, None] * stride_vh
             + dst_off[:, None] * stride_vn + offs_d[None, :] * stride_vd, v, mask=dmask)
    dst = scratch_ptr + ((scratch0 + local) * BLOCK_SIZE + dst_off)[:, None] * stride_st \
        + offs_d[None, :]
    smask = staged[:, None] & mask_d
    tl.store(dst, k, mask=smask)
    tl.store(dst + stride_sk, v, mask=smask)


@triton.jit
def _pooled_scatter(
    k_ptr, v_ptr, bt_ptr, dst_ptr, meta_ptr, lb_ptr, chunk_ptr, kb_ptr, start_ptr, cnt_ptr,
    scratch_ptr, pass_idx, tile, num_layers,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_br, stride_dr, stride_st, stride_sk,
    NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Pass ``pass_idx``: head h's staged tokens (those in the layer's own chunk) from the
    scratch into their head-pages of the layer's tensor."""
    r, head, layer, _, dst_row, layer_base, capacity, scratch0 = _pass_meta(
        meta_ptr, bt_ptr, stride_br, dst_ptr, stride_dr, chunk_ptr, lb_ptr, kb_ptr, pass_idx,
        num_layers, NUM_KV_HEADS)
    offs_t = (tile * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    idx = (r * num_layers + layer) * NUM_KV_HEADS + head
    count = tl.load(cnt_ptr + idx)
    entry = tl.load(start_ptr + idx).to(tl.int64) + offs_t // BLOCK_SIZE
    local = entry - pass_idx * capacity
    valid = (offs_t < count) & (local >= 0) & (local < capacity)
    mask = valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    blk = layer_base + tl.load(dst_row + local // NUM_KV_HEADS, mask=valid,
                               other=0).to(tl.int64)
    slot = local % NUM_KV_HEADS
    off = offs_t % BLOCK_SIZE
    src = scratch_ptr + ((scratch0 + local) * BLOCK_SIZE + off)[:, None] * stride_st \
        + offs_d[None, :]
    k = tl.load(src, mask=mask)
    v = tl.load(src + stride_sk, mask=mask)
    tl.store(k_ptr + blk[:, None] * stride_kb + slot[:, None] * stride_kh
             + off[:, None] * stride_kn + offs_d[None, :] * stride_kd, k, mask=mask)
    tl.store(v_ptr + blk[:, None] * stride_vb + slot[:, None] * stride_vh
             + off[:, None] * stride_vn + offs_d[None, :] * stride_vd, v, mask=mask)


@jit_unspecialized(ints=["pass_idx", "tiles", "num_layers", "width", "stride_br", "stride_dr",
                         "stride_mr", "stride_mk", "stride_mh", "stride_rr", "stride_rk",
                         "stride_rh"],
                   pointers=["lb_ptr", "dst_ptr"])
def _pooled_step(
    k_ptr, v_ptr, bt_ptr, dst_ptr, meta_ptr, lb_ptr, chunk_ptr, kb_ptr, start_ptr, cnt_ptr,
    mask_ptr, rank_ptr, scratch_ptr, pass_idx, tiles, num_layers, width,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_br, stride_dr, stride_mr, stride_mk, stride_mh, stride_rr, stride_rk, stride_rh,
    stride_sb, stride_st, stride_sk,
    GATHER: tl.constexpr, SCATTER: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One launch of the pass sequence, grid ``(R * H, tiles * (GATHER + SCATTER))``: the
    scatter of pass ``pass_idx - 1`` (the first ``tiles`` tiles) and/or the gather of pass
    ``pass_idx``. They touch disjoint memory: the gather reads only the tensor of layer
    ``chunk_layer[r, pass_idx]``, writes entries other than the scatter's, and stages
    into the other half of the scratch."""
    tile = tl.program_id(1)
    if SCATTER and GATHER:
        if tile < tiles:
            _pooled_scatter(
                k_ptr, v_ptr, bt_ptr, dst_ptr, meta_ptr, lb_ptr, chunk_ptr, kb_ptr,
                start_ptr, cnt_ptr, scratch_ptr + ((pass_idx - 1) % 2) * stride_sb,
                pass_idx - 1, tile, num_layers, stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd, stride_br, stride_dr, stride_st,
                stride_sk, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM, BLOCK_T, BLOCK_D)
        else:
            _pooled_gather(
                k_ptr, v_ptr, bt_ptr, dst_ptr, meta_ptr, lb_ptr, chunk_ptr, kb_ptr,
                start_ptr, mask_ptr, rank_ptr, scratch_ptr + (pass_idx % 2) * stride_sb,
                pass_idx, tile - tiles, num_layers, width, stride_kb, stride_kh, stride_kn,
                stride_kd, stride_vb, stride_vh, stride_vn, stride_vd, stride_br, stride_dr,
                stride_mr, stride_mk, stride_mh, stride_rr, stride_rk, stride_rh, stride_st,
                stride_sk, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM, BLOCK_T, BLOCK_D)
    elif SCATTER:
        _pooled_scatter(
            k_ptr, v_ptr, bt_ptr, dst_ptr, meta_ptr, lb_ptr, chunk_ptr, kb_ptr, start_ptr,
            cnt_ptr, scratch_ptr + ((pass_idx - 1) % 2) * stride_sb, pass_idx - 1, tile,
            num_layers, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh,
            stride_vn, stride_vd, stride_br, stride_dr, stride_st, stride_sk, NUM_KV_HEADS,
            BLOCK_SIZE, HEAD_DIM, BLOCK_T, BLOCK_D)
    else:
        _pooled_gather(
            k_ptr, v_ptr, bt_ptr, dst_ptr, meta_ptr, lb_ptr, chunk_ptr, kb_ptr, start_ptr,
            mask_ptr, rank_ptr, scratch_ptr + (pass_idx % 2) * stride_sb, pass_idx, tile,
            num_layers, width, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb,
            stride_vh, stride_vn, stride_vd, stride_br, stride_dr, stride_mr, stride_mk,
            stride_mh, stride_rr, stride_rk, stride_rh, stride_st, stride_sk, NUM_KV_HEADS,
            BLOCK_SIZE, HEAD_DIM, BLOCK_T, BLOCK_D)


def compact_pooled_rows_triton(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    block_rows: list[int],
    keep_masks: torch.Tensor,
    layer_bases: torch.Tensor,
    kept_blocks: list[int | None],
    dst_blocks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compact all ``K`` layers of ``R`` requests, head-pages pooled across the layers'
    tensors; contract of ``compaction.compact_pooled_rows_reference``.

    key_cache/value_cache: views over every layer's blocks (layer k's block b at
    ``layer_bases[k] + b``); keep_masks ``[R, K, H, Lmax]``; layer_bases ``[K]`` int
    (device or host); kept_blocks per row (None: the fewest blocks that hold its pages).
    dst_blocks: ``[R, W]`` integer destination ids (device or host; row r for request r),
    none of them a source block of any row; ``W`` must hold each row's kept blocks
    (checked on the host for planned counts, on the device for the others); None: in
    place. Returns (page_start ``[R, K, H]``, counts ``[R, K, H]``, chunk_layer ``[R, K]``,
    kept_blocks ``[R]``), int32 on the device. Nothing waits for the device on CUDA.

    Launches: the rank cumsum; ``_pooled_plan`` (grid ``(R,)``); then K passes over all
    rows, row r handling layer ``chunk_layer[r, i]`` in pass i (read on the device): a
    gather, then a scatter, the scatter of pass i sharing a launch with the gather of
    pass i + 1 (``_pooled_step``, K + 1 launches; 2K where the double scratch would be
    large). Pass i writes only to chunks ``<= i``; in stream order the earlier chunks'
    layers are compacted already, so only the layer's own chunk (at most
    ``kept_blocks * H`` entries per row; ``cdiv(Lmax, bs) * H`` where kept_blocks is
    None) needs the scratch.
    """
    rows, num_layers, heads, width = keep_masks.shape
    _, cache_heads, block_size, dim = key_cache.shape
    assert cache_heads == heads and value_cache.shape == key_cache.shape
    assert len(block_rows) == len(kept_blocks) == rows
    assert layer_bases.shape == (num_layers,)
    assert num_layers > 0 and width > 0
    dev = key_cache.device
    key_cache, value_cache = as_bytes(key_cache), as_bytes(value_cache)
    if rows == 0:
        empty = torch.zeros(0, num_layers, heads, dtype=torch.int32, device=dev)
        return (empty, empty.clone(), torch.zeros(0, num_layers, dtype=torch.int32, device=dev),
                torch.zeros(0, dtype=torch.int32, device=dev))
    block_table = block_table.to(dev)
    if layer_bases.device != dev:
        layer_bases = host_to_device(layer_bases.to(torch.int32), dev)
    elif layer_bases.dtype != torch.int32:
        layer_bases = layer_bases.to(torch.int32)
    layer_bases = layer_bases.contiguous()
    keep_masks = keep_masks.contiguous()
    # Scratch: one chunk (kept blocks * H head-pages) per row. Without a planned count the
    # blocks kept are at most cdiv(Lmax, bs) (every layer keeping everything).
    bound = -(-width // block_size)
    bases = [0]
    for blocks in kept_blocks:
        bases.append(bases[-1] + (bound if blocks is None else blocks) * heads)
    meta = on_device([[b, -1 if k is None else k, base] for b, k, base in
                      zip(block_rows, kept_blocks, bases, strict=False)], torch.int64, dev)
    dst = _dst_table(block_table, meta, dst_blocks, rows, dev)
    dst_width = dst.shape[1]
    planned = [k for k in kept_blocks if k is not None]
    if dst_blocks is not None and planned and max(planned) > dst_width:
        raise RuntimeError(f"pooled compaction needs up to {max(planned)} destination "
                           f"blocks per row but dst_blocks has {dst_width}")
    # Rank of each kept position within its (layer, head): 1-based, in position order.
    ranks = torch.cumsum(keep_masks, dim=3, dtype=torch.int32)
    counts = torch.empty(rows, num_layers, heads, dtype=torch.int32, device=dev)
    page_start = torch.empty_like(counts)
    chunk_layer = torch.empty(rows, num_layers, dtype=torch.int32, device=dev)
    kept = torch.empty(rows, dtype=torch.int32, device=dev)
    need = torch.empty_like(kept)
    _pooled_plan[(rows,)](ranks, meta, counts, page_start, chunk_layer, kept, need,
                          num_layers, width, ranks.stride(0), ranks.stride(1),
                          ranks.stride(2), NUM_KV_HEADS=heads, BLOCK_SIZE=block_size,
                          BLOCK_K=plan_block_layers(num_layers),
                          BLOCK_H=triton.next_power_of_2(heads))
    fits = need <= kept
    if dst_blocks is not None:  # measured rows: the destinations must hold the count
        fits &= kept <= dst_width
    if dev.type == "cuda":
        torch._assert_async(fits.all())
    else:
        short = (~fits).nonzero().flatten().tolist()
        if short:
            r = short[0]
            if int(need[r]) > int(kept[r]):
                raise RuntimeError(
                    f"pooled compaction of row {r} needs {int(need[r])} blocks per layer "
                    f"tensor ({num_layers} layers) but only {int(kept[r])} are reserved")
            raise RuntimeError(
                f"pooled compaction of row {r} needs {int(kept[r])} destination blocks but "
                f"dst_blocks has {dst_width}")
    masks_u8 = keep_masks.view(torch.uint8)
    # Fused (scatter i - 1 and gather i in one launch): two scratch halves, pass i staging
    # into half i % 2 while the scatter reads the other. Where that would take more than
    # _FUSED_SCRATCH_BYTES (no planned kept blocks: the bound is loose), one half and two
    # launches per pass.
    tokens = bases[-1] * block_size
    fused = 2 * tokens * 2 * dim * key_cache.element_size() <= _FUSED_SCRATCH_BYTES
    scratch = torch.empty(2 if fused else 1, tokens, 2, dim, dtype=key_cache.dtype,
                          device=dev)
    block_t = 64
    block_d = max(16, triton.next_power_of_2(dim))
    tiles = triton.cdiv(width, block_t)
    args = (key_cache, value_cache, block_table, dst, meta, layer_bases, chunk_layer, kept,
            page_start, counts, masks_u8, ranks, scratch)
    strides = (*key_cache.stride(), *value_cache.stride(), block_table.stride(0),
               dst.stride(0), *masks_u8.stride()[:3], *ranks.stride()[:3],
               scratch.stride(0) if fused else 0, *scratch.stride()[1:3])
    common = dict(NUM_KV_HEADS=heads, BLOCK_SIZE=block_size, HEAD_DIM=dim, BLOCK_T=block_t,
                  BLOCK_D=block_d)

    def step(pass_idx: int, gather: bool, scatter: bool) -> None:
        _pooled_step[(rows * heads, tiles * (int(gather) + int(scatter)))](
            *args, pass_idx, tiles, num_layers, width, *strides, GATHER=gather,
            SCATTER=scatter, **common)

    # In stream order. Pass i writes only into chunks <= i: in place, the tensors of the
    # layers compacted before it (their sources consumed) and its own (through the
    # scratch); destinations apart from the sources are never read.
    if fused:  # K + 1 launches: gather 0, (scatter i - 1 + gather i), scatter K - 1
        for i in range(num_layers + 1):
            step(i, gather=i < num_layers, scatter=i > 0)
    else:  # 2K launches: gather i, scatter i
        for i in range(num_layers):
            step(i, gather=True, scatter=False)
            step(i + 1, gather=False, scatter=True)
    return page_start, counts, chunk_layer, kept
