"""Scores of one decode-time event (issue 29): Triton kernels, read in place from the
paged layout the head-wise decode reads.

Same result as ``scoring.score_decode_event_reference``. Row ``r`` of the event (a
``decode.row_table`` row: batch row ``b``, slot ``s``, ``tail_start``, sequence length
``S``) and KV head ``h``: the candidates are the ``kept_counts[s, h]`` tokens of the
head's head-pages (entries from ``page_start[s, h]`` of the request's head-page
sequence, in page order), then the tail positions ``[tail_start, S - w)`` read through
block-table row ``b``. Candidate index ``c`` is that order: the token's index among the
head-page tokens, then ``kept + (position - tail_start)``. The window ``[S - w, S)`` lies
in the tail too, so every key a window query sees is at index ``c < kept + S -
tail_start``. Addresses are the decode's (``triton_decode._kept_addrs``: pooled over
layers with ``chunk_base``/``capacity``; the tail at ``layer_base + block``).

Two passes, no ``window x keys`` tensor:

* ``_event_stats``, grid ``(R, H * W_BLOCKS, S)``: program (row, head, window tile,
  split) takes the whole GQA group times a tile of ``BLOCK_W`` window queries
  (``BLOCK_G * BLOCK_W`` query rows) and keeps each query's max and sum of exponentials
  (log2 domain) over split ``s`` of the head's keys (contiguous tiles of ``PAGES``
  pages' worth of candidate indices; the window causally). The split count depends on
  the model shape only (``triton_scoring.default_num_splits``): a request's scores do
  not depend on the other rows of the event.
* ``_event_scores``, grid ``(R * H, cdiv(width, TILE))``: program (row, head, tile of
  ``TILE = PAGES * bs`` candidates) combines the splits' statistics of every (group
  head, window query), computes each one's probability on the tile's candidates, sums
  over the window, reduces over the group (mean or max) and stores fp32 scores.

Pooling along each head's candidate sequence then runs in torch on the ``[R, H,
width]`` output (``scoring.pool_candidates``, counts from the device tables: no host
sync). fp8 key caches (``KV_FP8``): key tiles are cast to the queries' dtype (exact) and
the scale, loaded from its one-element tensor, folded into the logit scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_adakv.kernels.decode import ROW_COLUMNS
from vllm_adakv.kernels.fp8 import is_fp8, scale_operand
from vllm_adakv.kernels.jit import jit_unspecialized
from vllm_adakv.kernels.scoring import pool_candidates
from vllm_adakv.kernels.triton_decode import _kept_addrs
from vllm_adakv.kernels.triton_scoring import _dot, block_d_of, default_num_splits
from vllm_adakv.tensors import host_to_device

_LOG2E = 1.4426950408889634
# Most key splits of the statistics pass (also the width of their combine tile, fixed so
# that one compiled variant serves every split count).
MAX_SPLITS = 16
# Candidate tile: about this many token slots (whole head-pages).
TILE_SLOTS = 64
# Query rows (group heads x window queries) per program, at most (the group is never cut).
MAX_QUERY_ROWS = 64
ROW_FIELDS: tl.constexpr = tl.constexpr(ROW_COLUMNS)


@triton.jit
def _event_keys(t, end, bt_row, cb_row, first_page, first_entry, capacity, kept,
                tail_start, layer_base, head, k_ptr, q_ptr, stride_bb, stride_cbk,
                stride_kb, stride_kh, stride_kn, stride_kd, offs_d, mask_d,
                NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, PAGES: tl.constexpr,
                BLOCK_N: tl.constexpr, POOLED: tl.constexpr, KV_FP8: tl.constexpr):
    """Keys ``[BLOCK_D, BLOCK_N]`` of candidate tile ``t`` of one (row, head): candidate
    index ``c`` of each slot, its position (-1 for a head-page token) and whether it holds
    a key (``c < kept + end - tail_start``: tail positions below ``end``)."""
    offs_t = tl.arange(0, BLOCK_N)
    page_of_t = offs_t // (BLOCK_N // PAGES)
    offs_n = offs_t % (BLOCK_N // PAGES)
    mask_n = offs_n < BLOCK_SIZE
    cand = (t * PAGES + page_of_t) * BLOCK_SIZE + offs_n
    kblock, kslot, kvalid = _kept_addrs(
        t, bt_row, cb_row, first_page, first_entry, capacity, kept, stride_bb, stride_cbk,
        page_of_t, offs_n, mask_n, NUM_KV_HEADS, BLOCK_SIZE, PAGES, POOLED)
    pos = tail_start + cand - kept
    tvalid = mask_n & (cand >= kept) & (pos < end)
    tblock = tl.load(bt_row + (pos // BLOCK_SIZE) * stride_bb, mask=tvalid, other=0)
    tblock = tblock.to(tl.int64)
    if POOLED:
        tblock = tblock + layer_base  # this layer's tensor in the all-layers view
    block = tl.where(kvalid, kblock, tblock)
    slot = tl.where(kvalid, kslot, head)
    in_page = tl.where(kvalid, offs_n, pos % BLOCK_SIZE).to(tl.int64)
    valid = kvalid | tvalid
    addr = (k_ptr + (block * stride_kb + slot * stride_kh + in_page * stride_kn)[None, :]
            + offs_d[:, None] * stride_kd)
    kt = tl.load(addr, mask=mask_d[:, None] & valid[None, :], other=0.0)
    if KV_FP8:
        kt = kt.to(q_ptr.dtype.element_ty)
    return kt, cand, tl.where(kvalid, -1, pos), valid


@triton.jit
def _row_setup(rows_ptr, r, head, pt_ptr, cnt_ptr, bt_ptr, cb_ptr, cap_ptr,
               stride_pr, stride_ph, stride_cr, stride_ch, stride_br, stride_cbs,
               stride_cap, POOLED: tl.constexpr):
    """Sequence length, tail start, kept count and the page addressing of (row, head)."""
    meta = rows_ptr + r * ROW_FIELDS
    batch_row = tl.load(meta + 0).to(tl.int64)
    slot_row = tl.load(meta + 1).to(tl.int64)
    tail_start = tl.load(meta + 4).to(tl.int32)
    seq_len = tl.load(meta + 5).to(tl.int32)
    kept = tl.load(cnt_ptr + slot_row * stride_cr + head * stride_ch).to(tl.int32)
    pt_row = pt_ptr + slot_row * stride_pr + head * stride_ph
    first_page = tl.load(pt_row).to(tl.int64)
    first_entry = 0  # (placeholders where the tables are not pooled)
    capacity = 1
    cb_row = cb_ptr
    if POOLED:
        capacity = tl.maximum(tl.load(cap_ptr + slot_row * stride_cap).to(tl.int32), 1)
        cb_row = cb_ptr + slot_row * stride_cbs
        first_entry = tl.load(pt_row).to(tl.int32)
    return (seq_len, tail_start, kept, bt_ptr + batch_row * stride_br, cb_row, first_page,
            first_entry, capacity)


@triton.jit
def _query_tile(q_ptr, r, head, w0, stride_qr, stride_qw, stride_qh, stride_qd, offs_d,
                mask_d, WINDOW: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                BLOCK_W: tl.constexpr):
    """Queries ``[BLOCK_G * BLOCK_W, BLOCK_D]`` (row ``g * BLOCK_W + i``: group head g,
    window query ``w0 + i``), their query head, window index and validity."""
    offs_m = tl.arange(0, BLOCK_G * BLOCK_W)
    g = offs_m // BLOCK_W
    wi = w0 + offs_m % BLOCK_W
    mask_m = (g < GROUP) & (wi < WINDOW)
    q_head = head * GROUP + g
    q = tl.load(q_ptr + r.to(tl.int64) * stride_qr + wi[:, None] * stride_qw
                + q_head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    return q, q_head, wi, mask_m


@jit_unspecialized(ints=["num_splits", "layer_base", "stride_qr", "stride_pr", "stride_cr",
                         "stride_br", "stride_cbs", "stride_cbk", "stride_cap"],
                   pointers=["ks_ptr", "pt_ptr", "cnt_ptr", "bt_ptr", "cb_ptr", "cap_ptr"])
def _event_stats(
    q_ptr, k_ptr, ks_ptr, pt_ptr, cnt_ptr, bt_ptr, rows_ptr, cb_ptr, cap_ptr, m_ptr, l_ptr,
    qk_scale, num_splits, layer_base,
    stride_qr, stride_qw, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_pr, stride_ph,
    stride_cr, stride_ch,
    stride_br, stride_bb,
    stride_cbs, stride_cbk, stride_cap,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    WINDOW: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGES: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    POOLED: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr = "ieee",
    KV_FP8: tl.constexpr = False,
):
    W_BLOCKS: tl.constexpr = (WINDOW + BLOCK_W - 1) // BLOCK_W
    TILE: tl.constexpr = PAGES * BLOCK_SIZE
    r = tl.program_id(0)
    head = tl.program_id(1) // W_BLOCKS
    w0 = (tl.program_id(1) % W_BLOCKS) * BLOCK_W
    split = tl.program_id(2)
    seq_len, tail_start, kept, bt_row, cb_row, first_page, first_entry, capacity = \
        _row_setup(rows_ptr, r, head, pt_ptr, cnt_ptr, bt_ptr, cb_ptr, cap_ptr, stride_pr,
                   stride_ph, stride_cr, stride_ch, stride_br, stride_cbs, stride_cap, POOLED)
    if KV_FP8:
        qk_scale = qk_scale * tl.load(ks_ptr)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q, q_head, wi, mask_m = _query_tile(q_ptr, r, head, w0, stride_qr, stride_qw, stride_qh,
                                        stride_qd, offs_d, mask_d, WINDOW, GROUP, BLOCK_G,
                                        BLOCK_W)
    q_pos = seq_len - WINDOW + wi
    # Every key of (row, head): the head-page tokens, then the tail up to S (window
    # included); this split's contiguous share of its tiles.
    n_keys = kept + tl.maximum(seq_len - tail_start, 0)
    tiles = (n_keys + TILE - 1) // TILE
    per_split = (tiles + num_splits - 1) // num_splits
    lo = tl.minimum(split * per_split, tiles)
    hi = tl.minimum(lo + per_split, tiles)
    m_i = tl.full([BLOCK_G * BLOCK_W], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G * BLOCK_W], tl.float32)
    for t in range(lo, hi):
        kt, cand, pos, valid_n = _event_keys(
            t, seq_len, bt_row, cb_row, first_page, first_entry, capacity, kept, tail_start,
            layer_base, head, k_ptr, q_ptr, stride_bb, stride_cbk, stride_kb, stride_kh,
            stride_kn, stride_kd, offs_d, mask_d, NUM_KV_HEADS, BLOCK_SIZE, PAGES, BLOCK_N,
            POOLED, KV_FP8)
        s = _dot(q, kt, DOT_FP32, PRECISION) * qk_scale
        visible = mask_m[:, None] & valid_n[None, :] & (pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    stat = ((r * num_splits + split) * (NUM_KV_HEADS * GROUP) + q_head) * WINDOW + wi
    tl.store(m_ptr + stat, m_i, mask=mask_m)
    tl.store(l_ptr + stat, l_i, mask=mask_m)


@jit_unspecialized(ints=["num_splits", "layer_base", "stride_qr", "stride_pr", "stride_cr",
                         "stride_br", "stride_cbs", "stride_cbk", "stride_cap", "stride_or",
                         "stride_oh", "width"],
                   pointers=["ks_ptr", "pt_ptr", "cnt_ptr", "bt_ptr", "cb_ptr", "cap_ptr",
                             "out_ptr"])
def _event_scores(
    q_ptr, k_ptr, ks_ptr, pt_ptr, cnt_ptr, bt_ptr, rows_ptr, cb_ptr, cap_ptr, m_ptr, l_ptr,
    out_ptr,
    qk_scale, num_splits, layer_base, width,
    stride_qr, stride_qw, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_pr, stride_ph,
    stride_cr, stride_ch,
    stride_br, stride_bb,
    stride_cbs, stride_cbk, stride_cap,
    stride_or, stride_oh,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    WINDOW: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGES: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    POOLED: tl.constexpr,
    REDUCE_MAX: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr = "ieee",
    KV_FP8: tl.constexpr = False,
):
    TILE: tl.constexpr = PAGES * BLOCK_SIZE
    r = tl.program_id(0) // NUM_KV_HEADS
    head = tl.program_id(0) % NUM_KV_HEADS
    t = tl.program_id(1)
    seq_len, tail_start, kept, bt_row, cb_row, first_page, first_entry, capacity = \
        _row_setup(rows_ptr, r, head, pt_ptr, cnt_ptr, bt_ptr, cb_ptr, cap_ptr, stride_pr,
                   stride_ph, stride_cr, stride_ch, stride_br, stride_cbs, stride_cap, POOLED)
    if KV_FP8:
        qk_scale = qk_scale * tl.load(ks_ptr)
    num_cand = kept + tl.maximum(seq_len - WINDOW - tail_start, 0)
    if t * TILE < num_cand:
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        # Candidates only: tail positions below S - w (all before every window query).
        kt, cand, pos, valid_n = _event_keys(
            t, seq_len - WINDOW, bt_row, cb_row, first_page, first_entry, capacity, kept,
            tail_start, layer_base, head, k_ptr, q_ptr, stride_bb, stride_cbk, stride_kb,
            stride_kh, stride_kn, stride_kd, offs_d, mask_d, NUM_KV_HEADS, BLOCK_SIZE,
            PAGES, BLOCK_N, POOLED, KV_FP8)
        offs_s = tl.arange(0, BLOCK_S)
        mass = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
        for w0 in range(0, WINDOW, BLOCK_W):
            q, q_head, wi, mask_m = _query_tile(q_ptr, r, head, w0, stride_qr, stride_qw,
                                                stride_qh, stride_qd, offs_d, mask_d, WINDOW,
                                                GROUP, BLOCK_G, BLOCK_W)
            # The splits' statistics of each query row, combined.
            idx = (((r * num_splits + offs_s[:, None]) * (NUM_KV_HEADS * GROUP)
                    + q_head[None, :]) * WINDOW + wi[None, :])
            both = (offs_s < num_splits)[:, None] & mask_m[None, :]
            m_s = tl.load(m_ptr + idx, mask=both, other=float("-inf"))
            l_s = tl.load(l_ptr + idx, mask=both, other=0.0)
            m = tl.max(m_s, 0)
            m = tl.where(mask_m, m, 0.0)
            den = tl.sum(l_s * tl.exp2(m_s - m[None, :]), 0)
            den = tl.where(mask_m, den, 1.0)
            s = _dot(q, kt, DOT_FP32, PRECISION) * qk_scale
            p = tl.exp2(s - m[:, None]) / den[:, None]
            p = tl.where(mask_m[:, None] & valid_n[None, :], p, 0.0)
            mass += tl.sum(tl.reshape(p, (BLOCK_G, BLOCK_W, BLOCK_N)), 1)
        if REDUCE_MAX:
            reduced = tl.max(mass, 0)  # padded group rows hold 0, every mass is >= 0
        else:
            reduced = tl.sum(mass, 0) / GROUP
        tl.store(out_ptr + r.to(tl.int64) * stride_or + head * stride_oh + cand, reduced,
                 mask=valid_n & (cand < width))


def _tiles(group: int, window: int, block_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_G, BLOCK_W, PAGES, BLOCK_N): the whole group times a window tile (at least
    16 and at most ``MAX_QUERY_ROWS`` rows where the group allows), and whole head-pages
    of about ``TILE_SLOTS`` token slots (each page padded to a power of two)."""
    block_g = triton.next_power_of_2(group)
    block_w = min(triton.next_power_of_2(window), max(1, MAX_QUERY_ROWS // block_g))
    block_w = max(block_w, 16 // block_g, 1)
    page = triton.next_power_of_2(block_size)
    pages = max(1, TILE_SLOTS // page)
    return block_g, block_w, pages, pages * page


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` (host tensors through pinned memory: no sync)."""
    return t if t.device == device else host_to_device(t, device)


def _event_tables(rows: torch.Tensor, page_start: torch.Tensor, kept_counts: torch.Tensor,
                  block_table: torch.Tensor, chunk_base: torch.Tensor | None,
                  capacity: torch.Tensor | None, layer_base: int, num_rows: int,
                  dev: torch.device) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...]]:
    """The event kernels' tables on ``dev``: ``(page_start, kept_counts, block_table,
    rows, chunk_base, capacity)`` and the strides of the last two (placeholders when the
    layout is not pooled; a pooled view without ``chunk_base`` gets the trivial table:
    pages in one chunk at offset 0, as the decode). Checks the row table."""
    if rows.dim() != 2 or rows.shape[0] != num_rows or rows.shape[1] != ROW_COLUMNS \
            or rows.dtype != torch.int32:
        raise ValueError(f"rows must be an int32 [{num_rows}, {ROW_COLUMNS}] row_table, "
                         f"got {rows.dtype} {tuple(rows.shape)}")
    rows, page_start, kept_counts, block_table = (
        _on(t, dev) for t in (rows.contiguous(), page_start, kept_counts, block_table))
    pooled = chunk_base is not None or layer_base != 0
    if pooled and chunk_base is None:
        chunk_base = torch.zeros(page_start.shape[0], 1, dtype=torch.int32, device=dev)
        capacity = torch.full((page_start.shape[0],), 2**31 - 1, dtype=torch.int32,
                              device=dev)
    if not pooled:
        return (page_start, kept_counts, block_table, rows, rows, rows), (0, 0, 0)
    if capacity is None:
        raise ValueError("chunk_base needs capacity")
    chunk_base, capacity = _on(chunk_base, dev), _on(capacity, dev)
    return ((page_start, kept_counts, block_table, rows, chunk_base, capacity),
            (*chunk_base.stride(), capacity.stride(0)))


def score_decode_event_triton(
    window_queries: torch.Tensor,
    key_cache: torch.Tensor,
    page_start: torch.Tensor,
    kept_counts: torch.Tensor,
    block_table: torch.Tensor,
    rows: torch.Tensor,
    width: int,
    scale: float,
    *,
    gqa_reduce: str,
    pooling: str,
    pool_kernel: int,
    chunk_base: torch.Tensor | None = None,
    capacity: torch.Tensor | None = None,
    layer_base: int = 0,
    k_scale: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Scores ``[R, H, width]`` (fp32, -inf padding) of one decode event's candidates;
    contract of ``scoring.score_decode_event_reference`` (module doc). Nothing waits for
    the device: the tables are read by the kernels, and ``width`` (a host int) must hold
    every (row, head)'s candidate count (candidates past it are not scored; the caller
    knows a bound, e.g. from ``decode_plan``). ``rows`` is ``decode.row_table`` (batch
    row, slot, tail start and sequence length are read). ``num_splits``: key splits of
    the statistics pass (default: from the model shape)."""
    if gqa_reduce not in ("mean", "max"):
        raise ValueError(f"unknown gqa_reduce {gqa_reduce!r}")
    if pooling not in ("max", "avg"):
        raise ValueError(f"unknown pooling {pooling!r}")
    if isinstance(pool_kernel, bool) or not isinstance(pool_kernel, int) \
            or pool_kernel < 1 or pool_kernel % 2 == 0:
        raise ValueError(f"pool_kernel must be a positive odd int, got {pool_kernel!r}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 0:
        raise ValueError(f"width must be an int >= 0, got {width!r}")
    if window_queries.dim() != 4 or key_cache.dim() != 4:
        raise ValueError("window_queries must be [R, w, Hq, D] and key_cache [nb, H, bs, D]")
    num_rows, window, num_q_heads, dim = window_queries.shape
    _, heads, block_size, kdim = key_cache.shape
    if kdim != dim or num_q_heads % heads:
        raise ValueError(f"window queries [.., {num_q_heads}, {dim}] do not match a cache of "
                         f"{heads} heads of {kdim}")
    if window < 1:
        raise ValueError("the window must hold at least one query")
    dev = key_cache.device
    pooled = chunk_base is not None or layer_base != 0
    tables, pooled_strides = _event_tables(rows, page_start, kept_counts, block_table,
                                           chunk_base, capacity, layer_base, num_rows, dev)
    page_start, kept_counts, block_table, rows = tables[:4]
    if window_queries.dtype == torch.float64:
        raise ValueError("float64 queries: use score_decode_event_reference")
    group = num_q_heads // heads
    out = torch.full((num_rows, heads, width), float("-inf"), dtype=torch.float32, device=dev)
    if num_rows == 0 or width == 0:
        return out
    window_queries = window_queries.to(dev)

    block_g, block_w, pages, block_n = _tiles(group, window, block_size)
    w_blocks = triton.cdiv(window, block_w)
    if num_splits is None:
        num_splits = default_num_splits(heads * w_blocks, dev)
    num_splits = max(1, min(int(num_splits), MAX_SPLITS))
    stats_m = torch.empty(num_rows, num_splits, num_q_heads, window, dtype=torch.float32,
                          device=dev)
    stats_l = torch.empty_like(stats_m)
    dot_fp32 = dev.type != "cuda" or window_queries.dtype == torch.float32
    fp8 = is_fp8(key_cache.dtype)
    ks = scale_operand(k_scale, key_cache, rows)
    qk_scale = float(scale) * _LOG2E
    strides = (*window_queries.stride(), *key_cache.stride(), *page_start.stride(),
               *kept_counts.stride(), *block_table.stride(), *pooled_strides)
    common = dict(NUM_KV_HEADS=heads, GROUP=group, WINDOW=window, BLOCK_SIZE=block_size,
                  HEAD_DIM=dim, PAGES=pages, BLOCK_G=block_g, BLOCK_W=block_w,
                  BLOCK_N=block_n, BLOCK_D=block_d_of(dim), POOLED=pooled,
                  DOT_FP32=dot_fp32, KV_FP8=fp8)
    _event_stats[(num_rows, heads * w_blocks, num_splits)](
        window_queries, key_cache, ks, *tables, stats_m, stats_l,
        qk_scale, num_splits, int(layer_base), *strides, **common)
    _event_scores[(num_rows * heads, triton.cdiv(width, pages * block_size))](
        window_queries, key_cache, ks, *tables, stats_m, stats_l, out,
        qk_scale, num_splits, int(layer_base), width, *strides, out.stride(0), out.stride(1),
        BLOCK_S=MAX_SPLITS, REDUCE_MAX=gqa_reduce == "max", **common)
    counts = (kept_counts[rows[:, 1].long()].long()
              + (rows[:, 5].long() - window - rows[:, 4].long()).clamp(min=0)[:, None])
    return pool_candidates(out, counts, pooling, pool_kernel)
