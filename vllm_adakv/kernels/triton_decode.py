"""Per-head paged attention for compressed requests: Triton kernels.

``headwise_attention_ranges_triton`` computes, for each row of a row table
(``decode.row_table``), what the torch reference
``decode.headwise_attention_ranges_reference`` computes (the CPU backend runs that). For
row r (slot s) and KV head h the keys are the ``kept_counts[s, h]`` tokens of the
head-pages h owns, consecutive entries of the request's head-page sequence from
``page_start[s, h]``, followed by the tail positions ``[tail_start, seq_len)`` read
through the row's block table row; a query at position p sees every kept token and the
tail up to p.

Design (split-K flash decoding):

* ``_headwise_fwd``, grid ``(R, H, num_splits)``: one program per (request row,
  KV head, split). It handles all ``G = Hq // H`` query heads of the group and
  the row's query tokens together: a tile of ``BLOCK_M = BLOCK_G * BLOCK_Q``
  query rows (query head x query token), looping over the row's tokens in
  chunks of ``BLOCK_Q`` (one chunk for decode). The (r, h) key sequence is cut
  into iterations of ``PAGES`` pages each (about 128 tokens: several independent
  page loads in flight): ``ceil(kept / bs)`` kept head-pages, then the tail
  blocks. Split s takes a contiguous range of those iterations
  (``ceil(n_iter / num_splits)`` each) and runs an fp32 online softmax (log2
  domain) over it. With one split it normalises and writes ``out`` directly;
  otherwise it writes its partial (max, sum of exp, unnormalised acc).
* ``_headwise_reduce``, grid ``(R, Hq)``: for each query token of the row, combines
  the partials of the splits of one query head and stores ``out`` in its dtype.
  Tokens outside the rows' query ranges are left untouched, as the reference does.
* Balanced splits (``balance_splits=S``, ``BALANCED``; the default where the one-split
  programs fill the SMs one to four times, ``default_balance_splits``): with one split
  per (row, head), as ``default_num_splits`` gives from 32 rows x 8 heads up on an
  H200, a row's longest head sets the time (Ada-KV's flat Dirichlet
  over 8 heads: ~2.7x the row's mean). The grid keeps ``S`` splits; program (r, h, s)
  loads row r's H kept counts, computes each head's iterations (the formula above)
  and their mean rounded up, and head h uses ``k_used = min(S, max(1, ceil(n_iter_h /
  max(mean, min_iters))))`` splits of ``ceil(n_iter_h / k_used)`` iterations. Who
  writes what: with ``k_used == 1`` split 0 normalises and writes ``out`` directly
  (no partial); with ``k_used > 1`` splits ``0 .. k_used - 1`` each write their
  partial (an empty one too: max -inf, sum 0, acc 0); splits ``>= k_used`` load and
  write nothing. The reduce recomputes ``k_used`` of its (row, head) from the same
  counts and row table with the same integer code (``_balanced_splits``), skips heads
  with ``k_used == 1`` (``out`` is the forward's) and combines only splits ``<
  k_used`` (the others are masked, never read: unwritten scratch may hold NaN).
  Recomputing costs H loads per reduce program and needs no marker buffer, no
  zeroing and no extra launch; both kernels read the same tables in the same stream,
  so they agree.

Measured on an H200 and removed (README, GPU status): the tail's and the next iteration's
table entries loaded ahead ("early tables": 0.90-1.04x the default's time at 2 stages on
pooled tables, 1.2-2.5x at 3) and splits of a fixed number of keys ("split_tokens":
faster only at 32 rows, 10-40% slower at keep 1).

Head-pages pooled across layers (``POOLED``): the caches view every
layer's blocks; entry g of a slot's sequence is chunk ``g // capacity[s]`` at block
offset ``chunk_base[s, chunk]``, and the tail reads this layer's tensor at
``layer_base``. Both tables are read in the kernel (CUDA-graph safe); ``layer_base``
is an unspecialised argument.

The grid depends on shapes only (R, H, T, Hq and ``num_splits`` or ``balance_splits``);
per-row lengths and counts are read inside the kernels, so nothing synchronises with the
device.
Key/value caches are logical ``[nb, H, bs, D]`` views with arbitrary strides
(e.g. keys stored transposed per head-page).

fp8 caches (``KV_FP8``, from the cache dtype; ``kernels.fp8``): K and V tiles are cast to
the query dtype (exact), the key scale is folded into the logit scale and the value
scale applied to the fp32 accumulator before it is normalised or written as a partial
(the reduce is linear in it); the scales are loaded from their one-element tensors.
Other caches compile the same code as before (``KV_FP8`` False, the scale pointers
never read).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_adakv.kernels.decode import ROW_COLUMNS
from vllm_adakv.kernels.fp8 import is_fp8, scale_operand
from vllm_adakv.kernels.jit import jit_unspecialized

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 64
# Balanced mode: a head is split only where it holds more than this many iterations
# (and more than its row's mean); a first guess, to be tuned on a GPU.
BALANCE_MIN_ITERS = 4
# The default decode balances splits when its one-split programs fill the SMs fewer than
# this many times over, on a grid of DEFAULT_BALANCE_SPLITS (``default_balance_splits``).
BALANCE_MAX_WAVES = 4
DEFAULT_BALANCE_SPLITS = 4
ROW_FIELDS: tl.constexpr = tl.constexpr(ROW_COLUMNS)


@triton.jit
def _kept_iters(kept, BLOCK_SIZE: tl.constexpr, PAGES: tl.constexpr):
    """Iterations over ``kept`` tokens' head-pages (scalar or vector)."""
    n_pages = (kept + BLOCK_SIZE - 1) // BLOCK_SIZE
    return (n_pages + PAGES - 1) // PAGES


@triton.jit
def _tail_iters(tail_start, seq_len, BLOCK_SIZE: tl.constexpr, PAGES: tl.constexpr):
    """Iterations over the tail blocks ``[tail_start, seq_len)`` (the same for every head)."""
    n_tail = tl.maximum((seq_len + BLOCK_SIZE - 1) // BLOCK_SIZE - tail_start // BLOCK_SIZE, 0)
    n_tail = tl.where(seq_len > tail_start, n_tail, 0)
    return (n_tail + PAGES - 1) // PAGES


@triton.jit
def _balanced_splits(cnt_row, stride_ch, n_iter, n_tail_it, num_splits, min_iters,
                     NUM_KV_HEADS: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr, PAGES: tl.constexpr):
    """Splits a head of ``n_iter`` iterations uses in balanced mode: enough that none
    holds more than the row's mean over its heads (rounded up, at least ``min_iters``),
    at most ``num_splits``, at least 1. Integer arithmetic only, on the row's kept counts
    (``cnt_row``): the forward and the reduce kernel get the same value."""
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < NUM_KV_HEADS
    kept_h = tl.load(cnt_row + offs_h * stride_ch, mask=mask_h, other=0).to(tl.int32)
    iters_h = tl.where(mask_h, _kept_iters(kept_h, BLOCK_SIZE, PAGES) + n_tail_it, 0)
    mean = (tl.sum(iters_h, 0) + NUM_KV_HEADS - 1) // NUM_KV_HEADS
    target = tl.maximum(mean, min_iters)
    k_used = tl.maximum((n_iter + target - 1) // target, 1)
    return tl.minimum(k_used, num_splits)


@triton.jit
def _kept_addrs(i, bt_row, cb_row, first_page, first_entry, capacity, kept,
                stride_bb, stride_cbk, page_of_t, offs_n, mask_n,
                NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, PAGES: tl.constexpr,
                POOLED: tl.constexpr):
    """(block, slot, valid) of each tile slot of kept iteration ``i`` of a head: where
    its head-pages lie. Slots past the head's kept tokens are invalid (no load made)."""
    pg = i * PAGES + page_of_t  # the head's page of each tile slot
    tok_idx = pg * BLOCK_SIZE + offs_n
    valid_n = mask_n & (tok_idx < kept)
    if POOLED:
        # Entry g = first_entry + pg of the pooled sequence: chunk g // capacity (a layer
        # tensor at block offset chunk_base), entry e = g % capacity of it -> block
        # block_row[e // H], slot e % H. One division per tile: its PAGES entries from g0
        # cross at most one chunk boundary when a chunk holds PAGES entries or more.
        g0 = first_entry + i * PAGES
        chunk0 = g0 // capacity
        rel = g0 - chunk0 * capacity + page_of_t
        if capacity >= PAGES:
            over = (rel >= capacity).to(tl.int32)
            chunk = chunk0 + over
            local = rel - over * capacity
        else:
            chunk = chunk0 + rel // capacity
            local = rel % capacity
        base = tl.load(cb_row + chunk * stride_cbk, mask=valid_n, other=0)
        block = tl.load(bt_row + (local // NUM_KV_HEADS) * stride_bb, mask=valid_n, other=0)
        block = block.to(tl.int64) + base.to(tl.int64)
        slot = (local % NUM_KV_HEADS).to(tl.int64)
    else:
        # Page pg of the head is entry first_page + pg of the request's head-page
        # sequence (block j, slot s) -> j * H + s.
        seq_idx = first_page + pg
        block = tl.load(bt_row + (seq_idx // NUM_KV_HEADS) * stride_bb, mask=valid_n,
                        other=0).to(tl.int64)
        slot = (seq_idx % NUM_KV_HEADS).to(tl.int64)
    return block, slot, valid_n


@triton.jit
def _tail_addrs(i, bt_row, first_tail_block, tail_start, seq_len, layer_base, head,
                stride_bb, page_of_t, offs_n, mask_n, BLOCK_SIZE: tl.constexpr,
                PAGES: tl.constexpr, POOLED: tl.constexpr):
    """(block, slot, valid, position) of each tile slot of tail iteration ``i``: blocks of
    the normal layout, this head's slot. Slots outside ``[tail_start, seq_len)`` are
    invalid (no load made)."""
    tb = first_tail_block + i * PAGES + page_of_t
    pos = tb * BLOCK_SIZE + offs_n
    valid_n = mask_n & (pos >= tail_start) & (pos < seq_len)
    block = tl.load(bt_row + tb * stride_bb, mask=valid_n, other=0).to(tl.int64)
    if POOLED:
        block = block + layer_base  # this layer's tensor in the all-layers view
    slot = tl.zeros_like(block) + head
    return block, slot, valid_n, pos


@triton.jit
def _tile_addrs(TAIL: tl.constexpr, i, bt_row, cb_row, first_page, first_entry,
                capacity, kept, first_tail_block, tail_start, seq_len, layer_base, head,
                stride_bb, stride_cbk, page_of_t, offs_n, mask_n,
                NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, PAGES: tl.constexpr,
                POOLED: tl.constexpr):
    """(block, slot, valid, position) of iteration ``i`` of the tail pass (``TAIL``) or
    of the kept pass (position: the index in the kept sequence, unused)."""
    if TAIL:
        block, slot, valid_n, pos = _tail_addrs(
            i, bt_row, first_tail_block, tail_start, seq_len, layer_base, head, stride_bb,
            page_of_t, offs_n, mask_n, BLOCK_SIZE, PAGES, POOLED)
    else:
        block, slot, valid_n = _kept_addrs(
            i, bt_row, cb_row, first_page, first_entry, capacity, kept, stride_bb,
            stride_cbk, page_of_t, offs_n, mask_n, NUM_KV_HEADS, BLOCK_SIZE, PAGES, POOLED)
        pos = (i * PAGES + page_of_t) * BLOCK_SIZE + offs_n
    return block, slot, valid_n, pos


@jit_unspecialized(ints=["num_splits", "min_iters", "stride_mt", "stride_mh", "stride_ms",
                         "stride_pr", "stride_cr", "stride_br", "layer_base", "stride_cbs",
                         "stride_cbk", "stride_cap"],
                   pointers=["pt_ptr", "cnt_ptr", "bt_ptr", "q_ptr", "out_ptr", "cb_ptr",
                             "cap_ptr", "ks_ptr", "vs_ptr"])
def _headwise_fwd(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, pt_ptr, cnt_ptr, bt_ptr, rows_ptr,
    out_ptr, mid_acc_ptr, mid_m_ptr, mid_l_ptr, cb_ptr, cap_ptr,
    qk_scale, num_splits, min_iters, layer_base,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pr, stride_ph,
    stride_cr, stride_ch,
    stride_br, stride_bb,
    stride_ot, stride_oh, stride_od,
    stride_mt, stride_mh, stride_ms,
    stride_cbs, stride_cbk, stride_cap,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SPLIT: tl.constexpr,
    BALANCED: tl.constexpr,
    BLOCK_H: tl.constexpr,
    POOLED: tl.constexpr,
    PAGES: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    KV_FP8: tl.constexpr = False,
):
    r = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    BLOCK_M: tl.constexpr = BLOCK_G * BLOCK_Q

    meta = rows_ptr + r * ROW_FIELDS
    batch_row = tl.load(meta + 0).to(tl.int64)
    slot_row = tl.load(meta + 1).to(tl.int64)
    q_start = tl.load(meta + 2).to(tl.int32)
    q_len = tl.load(meta + 3).to(tl.int32) - q_start
    tail_start = tl.load(meta + 4).to(tl.int32)
    seq_len = tl.load(meta + 5).to(tl.int32)
    mid_start = tl.load(meta + 6).to(tl.int32)
    kept = tl.load(cnt_ptr + slot_row * stride_cr + head * stride_ch).to(tl.int32)
    if KV_FP8:
        qk_scale = qk_scale * tl.load(ks_ptr)  # logits of fp8 keys: (q . k8) * k_scale

    # Iteration space of (row, head): kept head-pages, then the tail blocks, PAGES
    # pages (or blocks) per iteration.
    first_tail_block = tail_start // BLOCK_SIZE
    n_kept_it = _kept_iters(kept, BLOCK_SIZE, PAGES)
    n_tail_it = _tail_iters(tail_start, seq_len, BLOCK_SIZE, PAGES)
    n_iter = n_kept_it + n_tail_it
    q_todo = q_len
    if BALANCED:
        # This head's share of the grid's splits, from its row's counts (see
        # _balanced_splits); splits past it do nothing at all.
        k_used = _balanced_splits(cnt_ptr + slot_row * stride_cr, stride_ch, n_iter,
                                  n_tail_it, num_splits, min_iters, NUM_KV_HEADS, BLOCK_H,
                                  BLOCK_SIZE, PAGES)
        per_split = (n_iter + k_used - 1) // k_used
        q_todo = tl.where(split < k_used, q_len, 0)
    else:
        # Equal parts of this (row, head)'s sequence.
        per_split = (n_iter + num_splits - 1) // num_splits
    it_lo = tl.minimum(split * per_split, n_iter)
    it_hi = tl.minimum(it_lo + per_split, n_iter)
    kept_lo = tl.minimum(it_lo, n_kept_it)
    kept_hi = tl.minimum(it_hi, n_kept_it)
    tail_lo = tl.maximum(it_lo, n_kept_it) - n_kept_it
    tail_hi = tl.maximum(it_hi, n_kept_it) - n_kept_it

    offs_m = tl.arange(0, BLOCK_M)
    offs_g = offs_m // BLOCK_Q
    offs_qi = offs_m % BLOCK_Q
    # A tile is PAGES head-pages of BLOCK_N // PAGES slots (the block size, padded).
    offs_t = tl.arange(0, BLOCK_N)
    page_of_t = offs_t // (BLOCK_N // PAGES)
    offs_n = offs_t % (BLOCK_N // PAGES)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_n = offs_n < BLOCK_SIZE
    q_heads = head * GROUP + offs_g

    pt_row = pt_ptr + slot_row * stride_pr + head * stride_ph
    bt_row = bt_ptr + batch_row * stride_br
    first_page = tl.load(pt_row).to(tl.int64)
    first_entry = 0  # (placeholders where the tables are not pooled)
    capacity = 1
    cb_row = cb_ptr
    if POOLED:
        # Entries per chunk of this slot's pooled sequence (one chunk per layer tensor);
        # entry indices fit in int32.
        capacity = tl.maximum(tl.load(cap_ptr + slot_row * stride_cap).to(tl.int32), 1)
        cb_row = cb_ptr + slot_row * stride_cbs
        first_entry = tl.load(pt_row).to(tl.int32)
    # Offsets inside a head-page (token n, dim d), for K loaded as [D, N] and V as [N, D].
    k_in_page = offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_in_page = offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    for q0 in range(0, q_todo, BLOCK_Q):
        qi = q0 + offs_qi
        mask_m = (offs_g < GROUP) & (qi < q_len)
        q_pos = seq_len - q_len + qi
        tok = (q_start + qi).to(tl.int64)
        q = tl.load(
            q_ptr + tok[:, None] * stride_qt + q_heads[:, None] * stride_qh
            + offs_d[None, :] * stride_qd,
            mask=mask_m[:, None] & mask_d[None, :], other=0.0,
        )
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        for it in tl.static_range(2):
            # it == 0: kept head-pages; it == 1: tail blocks (normal layout).
            if it == 1:
                lo = tail_lo
                hi = tail_hi
            else:
                lo = kept_lo
                hi = kept_hi
            for i in range(lo, hi):
                block, slot, valid_n, pos = _tile_addrs(
                    it == 1, i, bt_row, cb_row, first_page, first_entry, capacity, kept,
                    first_tail_block, tail_start, seq_len, layer_base, head, stride_bb,
                    stride_cbk, page_of_t, offs_n, mask_n, NUM_KV_HEADS, BLOCK_SIZE, PAGES,
                    POOLED)
                valid = mask_m[:, None] & valid_n[None, :]
                if it == 1:
                    valid = valid & (pos[None, :] <= q_pos[:, None])
                k_base = block * stride_kb + slot * stride_kh  # per tile slot
                v_base = block * stride_vb + slot * stride_vh
                kt = tl.load(k_ptr + k_base[None, :] + k_in_page,
                             mask=mask_d[:, None] & valid_n[None, :], other=0.0)
                v = tl.load(v_ptr + v_base[:, None] + v_in_page,
                            mask=valid_n[:, None] & mask_d[None, :], other=0.0)
                if KV_FP8:  # exact casts; the scales apply to the logits and to acc
                    kt = kt.to(q_ptr.dtype.element_ty)
                    v = v.to(q_ptr.dtype.element_ty)
                if DOT_FP32:
                    s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
                elif USE_DOT:
                    s = tl.dot(q, kt, input_precision=DOT_PRECISION)
                else:
                    s = tl.sum(q.to(tl.float32)[:, :, None] * kt.to(tl.float32)[None, :, :], 1)
                s = tl.where(valid, s * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                if DOT_FP32:
                    pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32),
                                input_precision="ieee")
                elif USE_DOT:
                    pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
                else:
                    pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], 1)
                acc = acc * alpha[:, None] + pv
                m_i = m_new

        if KV_FP8:
            acc = acc * tl.load(vs_ptr)  # sum_j p_j (v8_j * v_scale)
        # Balanced: a head on one split writes out itself (the reduce leaves it alone),
        # a head on several writes a partial from each of its k_used splits.
        mask_out = mask_m
        mask_mid = mask_m
        if BALANCED:
            # (a vector comparison: the interpreter gives a scalar one int32 data)
            k_used_m = tl.zeros([BLOCK_M], tl.int32) + k_used
            mask_out = mask_m & (k_used_m == 1)
            mask_mid = mask_m & (k_used_m > 1)
        if (not SPLIT) or BALANCED:
            l_safe = tl.where(l_i > 0.0, l_i, 1.0)
            o = acc / l_safe[:, None]
            tl.store(
                out_ptr + tok[:, None] * stride_ot + q_heads[:, None] * stride_oh
                + offs_d[None, :] * stride_od,
                o.to(out_ptr.dtype.element_ty),
                mask=mask_out[:, None] & mask_d[None, :],
            )
        if SPLIT:
            mtok = (mid_start + qi).to(tl.int64)
            mid = mtok * stride_mt + q_heads * stride_mh + split * stride_ms
            tl.store(mid_m_ptr + mid, m_i, mask=mask_mid)
            tl.store(mid_l_ptr + mid, l_i, mask=mask_mid)
            tl.store(
                mid_acc_ptr + mid[:, None] * BLOCK_D + offs_d[None, :], acc,
                mask=mask_mid[:, None],
            )


@jit_unspecialized(ints=["num_splits", "min_iters", "stride_mt", "stride_mh", "stride_ms",
                         "stride_cr"],
                   pointers=["out_ptr", "cnt_ptr"])
def _headwise_reduce(
    out_ptr, mid_acc_ptr, mid_m_ptr, mid_l_ptr, rows_ptr, cnt_ptr, num_splits, min_iters,
    stride_ot, stride_oh, stride_od,
    stride_mt, stride_mh, stride_ms,
    stride_cr, stride_ch,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BALANCED: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    PAGES: tl.constexpr,
):
    r = tl.program_id(0)
    qh = tl.program_id(1)
    meta = rows_ptr + r * ROW_FIELDS
    q_start = tl.load(meta + 2).to(tl.int32)
    q_end = tl.load(meta + 3).to(tl.int32)
    mid_start = tl.load(meta + 6).to(tl.int32)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    n_tok = q_end - q_start
    mask_s = offs_s < num_splits
    if BALANCED:
        # The forward's split count of this head, recomputed the same way: only its
        # k_used partials were written; with one, the forward wrote out itself.
        slot_row = tl.load(meta + 1).to(tl.int64)
        tail_start = tl.load(meta + 4).to(tl.int32)
        seq_len = tl.load(meta + 5).to(tl.int32)
        cnt_row = cnt_ptr + slot_row * stride_cr
        kept = tl.load(cnt_row + (qh // GROUP) * stride_ch).to(tl.int32)
        n_tail_it = _tail_iters(tail_start, seq_len, BLOCK_SIZE, PAGES)
        n_iter = _kept_iters(kept, BLOCK_SIZE, PAGES) + n_tail_it
        k_used = _balanced_splits(cnt_row, stride_ch, n_iter, n_tail_it, num_splits,
                                  min_iters, NUM_KV_HEADS, BLOCK_H, BLOCK_SIZE, PAGES)
        mask_s = offs_s < k_used
        n_tok = tl.where(k_used > 1, n_tok, 0)
    for i in range(0, n_tok):
        tok = (q_start + i).to(tl.int64)
        mid = ((mid_start + i).to(tl.int64) * stride_mt + qh * stride_mh
               + offs_s * stride_ms)
        m = tl.load(mid_m_ptr + mid, mask=mask_s, other=float("-inf"))
        ls = tl.load(mid_l_ptr + mid, mask=mask_s, other=0.0)
        m_max = tl.max(m, 0)
        m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
        w = tl.exp2(m - m_safe)
        denom = tl.sum(ls * w, 0)
        denom = tl.where(denom > 0.0, denom, 1.0)
        acc = tl.load(mid_acc_ptr + mid[:, None] * BLOCK_D + offs_d[None, :],
                      mask=mask_s[:, None], other=0.0)
        o = tl.sum(acc * w[:, None], 0) / denom
        tl.store(out_ptr + tok * stride_ot + qh * stride_oh + offs_d * stride_od,
                 o.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (8 under the interpreter, on CPU tensors)."""
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def num_programs_target(device: torch.device) -> int:
    """Programs that fill the device: twice its SM count."""
    return 2 * sm_count(device)


def default_num_splits(num_rows: int, num_kv_heads: int, max_iters: int,
                       device: torch.device) -> int:
    """Splits per (row, head), from shapes only; a power of two.

    Split-K only pays when the (row, head) programs are fewer than the SMs: then enough
    splits to give each SM one program, with at least 4 iterations per split on the
    longest possible key sequence (``max_iters`` iterations). Measured on an H200
    (benchmarks/results/kernels-h200-2026-12-01-sweep.json): one split is fastest from
    32 rows x 8 heads up; 16 splits at 1 row x 8 heads.
    """
    programs = max(num_rows * num_kv_heads, 1)
    want = max(1, sm_count(device) // programs)
    longest = max(1, triton.cdiv(max_iters, 4))
    splits = max(1, min(want, longest, _MAX_SPLITS))
    return 1 << (splits.bit_length() - 1)


def default_balance_splits(num_rows: int, num_kv_heads: int, device: torch.device
                           ) -> int | None:
    """Balanced splits' grid for the default decode, or ``None`` for the plain kernel.

    Measured under CUDA graphs on an H200 (132 SMs; Ada-KV-like uneven heads;
    benchmarks/results/kernels-h200-2026-12-01-graphs-balance.json): where the default
    gives one split per (row, head) and those programs fill the SMs one to four times
    (32 rows x 8 heads), balanced splits of a 4-split grid cut the time to 0.52-0.85x at
    keep 1/4 and 1/16 (tie to +15% only where the kernel takes < 30 us: keep 1, 2k x 1/16);
    from 128 rows up (7.8 SM waves) the row's heads average out over the waves and the
    idle programs and reduce launch cost 3-17% at 2k, so the plain kernel stays there
    (it still loses 11-20% to balance at 32k).
    """
    programs = num_rows * num_kv_heads
    sms = sm_count(device)
    if sms <= programs < BALANCE_MAX_WAVES * sms:
        return DEFAULT_BALANCE_SPLITS
    return None


# Largest K (and V) tile, tokens x head-dim elements, by the bytes of the dots' operands
# (the query's dtype): the compiled kernel's shared memory grows with it. Compiled for
# sm_90 (tests/kernels/test_cuda_compile.py): 128 x 128 needs 41 KB in bf16 and 148 KB in
# fp32 (173 KB on an fp8 cache); 128 x 256 in fp32 needs 287 KB, 344 KB on an fp8 cache,
# over the H100's 227 KB (an fp32 model with head_dim 256 stopped at warm-up there).
_MAX_TILE_ELEMENTS = {2: 128 * 256, 4: 128 * 128}


def default_pages_per_iter(block_size: int, head_dim: int = 128, operand_bytes: int = 2
                           ) -> int:
    """Head-pages per loop iteration: tiles of about 128 tokens (more loads in flight;
    8 pages of 16 beat 4 and 2 at every swept shape on an H200), fewer where a tile of
    ``head_dim`` would pass ``_MAX_TILE_ELEMENTS`` for ``operand_bytes``."""
    page = triton.next_power_of_2(block_size)
    tokens = _MAX_TILE_ELEMENTS[min(max(operand_bytes, 2), 4)] // max(
        16, triton.next_power_of_2(head_dim))
    return max(1, min(128, tokens) // page)


def _scratch(*shape: int, device: torch.device) -> torch.Tensor:
    """Uninitialised fp32 split-K scratch (the tests fill it with NaN instead: no kernel
    may read a partial it did not write)."""
    return torch.empty(*shape, dtype=torch.float32, device=device)


def _int_in(name: str, value, lo: int, hi: int) -> int:
    """``value`` as an int in ``[lo, hi]``, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")
    return int(value)


def headwise_attention_ranges_triton(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    page_start: torch.Tensor,
    kept_counts: torch.Tensor,
    block_table: torch.Tensor,
    rows: torch.Tensor,
    num_row_tokens: int,
    scale: float,
    out: torch.Tensor,
    num_splits: int | None = None,
    pages_per_iter: int | None = None,
    launch: dict | None = None,
    chunk_base: torch.Tensor | None = None,
    capacity: torch.Tensor | None = None,
    layer_base: int = 0,
    balance_splits: int | None = None,
    balance_min_iters: int = BALANCE_MIN_ITERS,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-wise attention for selected batch rows, pages given as ranges.

    Head h of the request in slot s owns the ``ceil(kept_counts[s, h] / bs)`` head-pages
    that start at entry ``page_start[s, h]`` of its block row's head-page sequence (entry
    i: block ``block_table[b, i // H]``, slot ``i % H``); page_start/kept_counts are
    ``[S, H]``, block_table ``[B, NB]`` of the whole batch. ``rows`` is ``row_table(...)``;
    ``num_row_tokens`` the sum of its query lengths (the split-K scratch's size). Only the
    rows' query tokens of ``out`` are written; each gets what
    ``decode.headwise_attention_ranges_reference`` computes (module doc).

    ``num_splits`` splits each (row, head) key sequence over that many programs (default:
    from shapes), or ``balance_splits`` (a grid of that many splits per head) gives each
    head of a row as many of them as it needs so that none holds more than the row's mean
    iterations per head (at least ``balance_min_iters``); at most one of the two.
    ``pages_per_iter`` head-pages are read per loop iteration (default: 128-token tiles).
    ``launch`` (e.g. ``{"num_warps": 8, "num_stages": 2}``) overrides Triton's launch
    defaults.

    Pooled over layers: ``key_cache``/``value_cache`` view every layer's blocks,
    ``chunk_base`` (int32 ``[S, K]``) and ``capacity`` (int32 ``[S]``) on the device
    place entry g of slot s's sequence at block ``chunk_base[s, g // capacity[s]] +
    block_row[(g % capacity[s]) // H]``, slot ``g % H`` (both read by the kernel, so
    they may be persistent tensors under a CUDA graph), and this layer's tail blocks
    are ``layer_base + block_row[pos // bs]``. ``layer_base`` is not specialised on:
    one compiled variant serves every layer. Without ``chunk_base`` (and ``layer_base``
    0) the kernel is the single-layer one, a separate compile-time variant with the
    same code and speed as before pooling.

    fp8 caches (``float8_e4m3fn`` or ``float8_e5m2`` views): ``k_scale``/``v_scale`` are
    their dequantization scales, one-element float32 tensors on the device (None: 1;
    ignored for other caches), read by the kernel. Computes in fp32 (dots of the query
    dtype, as for a cache of that dtype), stores in ``out``'s dtype.
    """
    num_tokens, num_q_heads, dim = query.shape
    _, heads, block_size, kdim = key_cache.shape
    assert kdim == dim and value_cache.shape == key_cache.shape
    assert num_q_heads % heads == 0
    assert out.shape == query.shape
    assert rows.dtype == torch.int32 and rows.is_contiguous() and rows.shape[1] == ROW_COLUMNS
    assert page_start.dim() == 2
    num_rows = rows.shape[0]
    group = num_q_heads // heads
    if num_rows == 0 or num_tokens == 0:
        return out
    max_iters = block_table.shape[1] + 1
    if pages_per_iter is None:
        pages_per_iter = default_pages_per_iter(block_size, dim, query.element_size())
    pages_per_iter = triton.next_power_of_2(max(1, int(pages_per_iter)))
    balanced = False
    if balance_splits is not None:
        if num_splits is not None:
            raise ValueError("balance_splits replaces num_splits: give one")
        balance_splits = _int_in("balance_splits", balance_splits, 1, _MAX_SPLITS)
        balance_min_iters = _int_in("balance_min_iters", balance_min_iters, 1, 2**31 - 1)
        # One split: every head has k_used = 1, i.e. the plain one-split kernel.
        num_splits = balance_splits
        balanced = num_splits > 1
    elif num_splits is None:
        num_splits = default_num_splits(num_rows, heads, triton.cdiv(max_iters, pages_per_iter),
                                        query.device)
        if num_splits == 1:
            default_balance = default_balance_splits(num_rows, heads, query.device)
            if default_balance is not None:
                num_splits, balanced = default_balance, True
    num_splits = max(1, min(int(num_splits), _MAX_SPLITS))

    block_g = triton.next_power_of_2(group)
    block_q = max(1, 16 // block_g)
    block_n = triton.next_power_of_2(block_size) * pages_per_iter
    block_d = max(16, triton.next_power_of_2(dim))
    block_h = max(2, triton.next_power_of_2(heads))
    use_dot = block_n >= 16
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    # The Triton interpreter (CPU tensors) multiplies bf16 tl.dot operands as raw bits:
    # there, dots run on fp32 copies of the same rounded values.
    dot_fp32 = use_dot and query.device.type != "cuda"

    if num_splits > 1:
        dev = query.device
        mid_m = _scratch(max(num_row_tokens, 1), num_q_heads, num_splits, device=dev)
        mid_l = _scratch(*mid_m.shape, device=dev)
        mid_acc = _scratch(max(num_row_tokens, 1), num_q_heads, num_splits, block_d,
                           device=dev)
        mid_strides = mid_m.stride()
    else:
        mid_m = mid_l = mid_acc = out  # unused
        mid_strides = (0, 0, 0)
    pooled = chunk_base is not None or layer_base != 0
    if pooled and chunk_base is None:
        # A layer's tail in an all-layers view, pages in one chunk at offset 0 (the
        # reference's single-layer page layout): the pooled kernel with a trivial table.
        chunk_base = torch.zeros(page_start.shape[0], 1, dtype=torch.int32, device=query.device)
        capacity = torch.full((page_start.shape[0],), 2**31 - 1, dtype=torch.int32,
                              device=query.device)
    if pooled:
        assert capacity is not None
        assert chunk_base.dim() == 2 and capacity.dim() == 1
        assert chunk_base.device == query.device and capacity.device == query.device
        pooled_args = (chunk_base, capacity)
        pooled_strides = (*chunk_base.stride(), capacity.stride(0))
    else:
        pooled_args = (rows, rows)  # unused
        pooled_strides = (0, 0, 0)

    _headwise_fwd[(num_rows, heads, num_splits)](
        query, key_cache, value_cache, scale_operand(k_scale, key_cache, rows),
        scale_operand(v_scale, value_cache, rows), page_start, kept_counts, block_table, rows,
        out, mid_acc, mid_m, mid_l, *pooled_args,
        float(scale) * _LOG2E, num_splits, int(balance_min_iters), int(layer_base),
        *query.stride(),
        *key_cache.stride(),
        *value_cache.stride(),
        *page_start.stride(),
        *kept_counts.stride(),
        *block_table.stride(),
        *out.stride(),
        *mid_strides,
        *pooled_strides,
        NUM_KV_HEADS=heads,
        GROUP=group,
        BLOCK_SIZE=block_size,
        HEAD_DIM=dim,
        SPLIT=num_splits > 1,
        BALANCED=balanced,
        BLOCK_H=block_h,
        POOLED=pooled,
        PAGES=pages_per_iter,
        BLOCK_G=block_g,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        USE_DOT=use_dot,
        DOT_PRECISION=precision,
        DOT_FP32=dot_fp32,
        KV_FP8=is_fp8(key_cache.dtype),
        **(launch or {}),
    )
    if num_splits > 1:
        # What the balanced reduce recomputes k_used from; fixed placeholders otherwise
        # (one compiled variant of the plain reduce per grid, as before).
        shape_consts = dict(NUM_KV_HEADS=heads, GROUP=group, BLOCK_H=block_h,
                            BLOCK_SIZE=block_size, PAGES=pages_per_iter) if balanced else \
            dict(NUM_KV_HEADS=1, GROUP=1, BLOCK_H=2, BLOCK_SIZE=1, PAGES=1)
        _headwise_reduce[(num_rows, num_q_heads)](
            out, mid_acc, mid_m, mid_l, rows, kept_counts, num_splits, int(balance_min_iters),
            *out.stride(),
            *mid_strides,
            *kept_counts.stride(),
            HEAD_DIM=dim,
            BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=block_d,
            BALANCED=balanced,
            **shape_consts,
        )
    return out
