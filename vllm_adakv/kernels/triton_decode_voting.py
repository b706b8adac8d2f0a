"""GVote's voter probabilities at a decode event (issue 29): Triton kernels, read in
place from the paged layout the head-wise decode reads.

Same result as ``voting.decode_voter_probs_event_reference``: row ``r`` (a
``decode.row_table`` row) and KV head ``h``; every voter of the head's query group
attends, without a causal mask, over every key the head holds: its candidates (the
``kept_counts[s, h]`` head-page tokens, then the tail ``[tail_start, S - w)``) and the
window ``[S - w, S)``. Keys are addressed and indexed as in ``triton_reselect`` (its
``_row_setup``, ``_event_keys`` and ``_query_tile``): key index ``c`` runs over the
head-page tokens, then the tail up to ``S``; ``c < n`` (``n = kept + S - w -
tail_start``) is candidate ``c`` (output column ``c``), ``c >= n`` window key ``c - n``
(column ``width + c - n``).

Two passes, as ``triton_reselect`` (no ``voters x keys`` tensor in memory beyond the
output itself):

* ``_decode_voter_stats``, grid ``(R, H * V_BLOCKS, S)``: program (row, head, voter tile,
  split) takes the whole GQA group times ``BLOCK_W`` voters and keeps each voter's max
  and sum of exponentials (log2 domain) over split ``s`` of the head's keys.
* ``_decode_voter_probs``, grid ``(R * H * V_BLOCKS, cdiv(width + w, TILE))``: program (row,
  head, voter tile, key tile) combines the splits and stores each voter's fp32
  probabilities on the tile's keys.

The output is zero where nothing is stored: candidate padding ``[n, width)``. fp8 key
caches: key tiles cast to the voters' dtype and ``k_scale`` folded into the logit scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_adakv.kernels.fp8 import is_fp8, scale_operand
from vllm_adakv.kernels.jit import jit_unspecialized
from vllm_adakv.kernels.triton_reselect import (
    MAX_SPLITS,
    _event_keys,
    _event_tables,
    _query_tile,
    _row_setup,
    _tiles,
)
from vllm_adakv.kernels.triton_scoring import _dot, block_d_of, default_num_splits

_LOG2E = 1.4426950408889634


@jit_unspecialized(ints=["num_splits", "layer_base", "stride_qr", "stride_pr", "stride_cr",
                         "stride_br", "stride_cbs", "stride_cbk", "stride_cap"],
                   pointers=["ks_ptr", "pt_ptr", "cnt_ptr", "bt_ptr", "cb_ptr", "cap_ptr"])
def _decode_voter_stats(
    q_ptr, k_ptr, ks_ptr, pt_ptr, cnt_ptr, bt_ptr, rows_ptr, cb_ptr, cap_ptr, m_ptr, l_ptr,
    qk_scale, num_splits, layer_base,
    stride_qr, stride_qv, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_pr, stride_ph,
    stride_cr, stride_ch,
    stride_br, stride_bb,
    stride_cbs, stride_cbk, stride_cap,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    VOTERS: tl.constexpr,
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
    V_BLOCKS: tl.constexpr = (VOTERS + BLOCK_W - 1) // BLOCK_W
    TILE: tl.constexpr = PAGES * BLOCK_SIZE
    r = tl.program_id(0)
    head = tl.program_id(1) // V_BLOCKS
    v0 = (tl.program_id(1) % V_BLOCKS) * BLOCK_W
    split = tl.program_id(2)
    seq_len, tail_start, kept, bt_row, cb_row, first_page, first_entry, capacity = \
        _row_setup(rows_ptr, r, head, pt_ptr, cnt_ptr, bt_ptr, cb_ptr, cap_ptr, stride_pr,
                   stride_ph, stride_cr, stride_ch, stride_br, stride_cbs, stride_cap, POOLED)
    if KV_FP8:
        qk_scale = qk_scale * tl.load(ks_ptr)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q, q_head, vi, mask_m = _query_tile(q_ptr, r, head, v0, stride_qr, stride_qv, stride_qh,
                                        stride_qd, offs_d, mask_d, VOTERS, GROUP, BLOCK_G,
                                        BLOCK_W)
    # Every key of (row, head), no causal mask; this split's contiguous share of tiles.
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
        s = tl.where(mask_m[:, None] & valid_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    stat = ((r * num_splits + split) * (NUM_KV_HEADS * GROUP) + q_head) * VOTERS + vi
    tl.store(m_ptr + stat, m_i, mask=mask_m)
    tl.store(l_ptr + stat, l_i, mask=mask_m)


@jit_unspecialized(ints=["num_splits", "layer_base", "stride_qr", "stride_pr", "stride_cr",
                         "stride_br", "stride_cbs", "stride_cbk", "stride_cap", "stride_or",
                         "stride_oh", "stride_ov", "width"],
                   pointers=["ks_ptr", "pt_ptr", "cnt_ptr", "bt_ptr", "cb_ptr", "cap_ptr",
                             "out_ptr"])
def _decode_voter_probs(
    q_ptr, k_ptr, ks_ptr, pt_ptr, cnt_ptr, bt_ptr, rows_ptr, cb_ptr, cap_ptr, m_ptr, l_ptr,
    out_ptr,
    qk_scale, num_splits, layer_base, width,
    stride_qr, stride_qv, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_pr, stride_ph,
    stride_cr, stride_ch,
    stride_br, stride_bb,
    stride_cbs, stride_cbk, stride_cap,
    stride_or, stride_oh, stride_ov,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    VOTERS: tl.constexpr,
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
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr = "ieee",
    KV_FP8: tl.constexpr = False,
):
    V_BLOCKS: tl.constexpr = (VOTERS + BLOCK_W - 1) // BLOCK_W
    TILE: tl.constexpr = PAGES * BLOCK_SIZE
    pid = tl.program_id(0)
    r = pid // (NUM_KV_HEADS * V_BLOCKS)
    head = (pid // V_BLOCKS) % NUM_KV_HEADS
    v0 = (pid % V_BLOCKS) * BLOCK_W
    t = tl.program_id(1)
    seq_len, tail_start, kept, bt_row, cb_row, first_page, first_entry, capacity = \
        _row_setup(rows_ptr, r, head, pt_ptr, cnt_ptr, bt_ptr, cb_ptr, cap_ptr, stride_pr,
                   stride_ph, stride_cr, stride_ch, stride_br, stride_cbs, stride_cap, POOLED)
    if KV_FP8:
        qk_scale = qk_scale * tl.load(ks_ptr)
    n_keys = kept + tl.maximum(seq_len - tail_start, 0)
    if t * TILE < n_keys:
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        kt, cand, pos, valid_n = _event_keys(
            t, seq_len, bt_row, cb_row, first_page, first_entry, capacity, kept, tail_start,
            layer_base, head, k_ptr, q_ptr, stride_bb, stride_cbk, stride_kb, stride_kh,
            stride_kn, stride_kd, offs_d, mask_d, NUM_KV_HEADS, BLOCK_SIZE, PAGES, BLOCK_N,
            POOLED, KV_FP8)
        q, q_head, vi, mask_m = _query_tile(q_ptr, r, head, v0, stride_qr, stride_qv,
                                            stride_qh, stride_qd, offs_d, mask_d, VOTERS,
                                            GROUP, BLOCK_G, BLOCK_W)
        offs_s = tl.arange(0, BLOCK_S)
        idx = (((r * num_splits + offs_s[:, None]) * (NUM_KV_HEADS * GROUP)
                + q_head[None, :]) * VOTERS + vi[None, :])
        both = (offs_s < num_splits)[:, None] & mask_m[None, :]
        m_s = tl.load(m_ptr + idx, mask=both, other=float("-inf"))
        l_s = tl.load(l_ptr + idx, mask=both, other=0.0)
        m = tl.max(m_s, 0)
        m = tl.where(mask_m, m, 0.0)
        den = tl.sum(l_s * tl.exp2(m_s - m[None, :]), 0)
        den = tl.where(mask_m, den, 1.0)
        s = _dot(q, kt, DOT_FP32, PRECISION) * qk_scale
        p = tl.exp2(s - m[:, None]) / den[:, None]
        # Candidates to columns [0, n) (none past width), the window to [width, width+w).
        n_cand = kept + tl.maximum(seq_len - WINDOW - tail_start, 0)
        col = tl.where(cand < n_cand, cand, width + cand - n_cand)
        store_n = valid_n & ((cand >= n_cand) | (cand < width))
        voter_row = (q_head - head * GROUP) * VOTERS + vi  # g * V + v
        addr = (out_ptr + r.to(tl.int64) * stride_or + head * stride_oh
                + voter_row[:, None].to(tl.int64) * stride_ov + col[None, :])
        tl.store(addr, p, mask=mask_m[:, None] & store_n[None, :])


def decode_voter_probs_triton(
    voters: torch.Tensor,
    key_cache: torch.Tensor,
    page_start: torch.Tensor,
    kept_counts: torch.Tensor,
    block_table: torch.Tensor,
    rows: torch.Tensor,
    window: int,
    width: int,
    scale: float,
    *,
    chunk_base: torch.Tensor | None = None,
    capacity: torch.Tensor | None = None,
    layer_base: int = 0,
    k_scale: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Voter probabilities ``[R, H, G * V, width + window]`` (fp32, zero padding) of one
    decode event; contract of ``voting.decode_voter_probs_event_reference`` (module doc).
    No host sync: ``width`` and ``window`` are host ints, and ``width`` must hold every
    (row, head)'s candidates (not checked: past it, candidates are not stored and window
    columns may be missed; the torch path refuses). ``num_splits``: key splits of the
    statistics pass (default: from the model shape)."""
    for name, value, least in (("width", width, 0), ("window", window, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    if voters.dim() != 4 or key_cache.dim() != 4:
        raise ValueError("voters must be [R, V, Hq, D] and key_cache [nb, H, bs, D]")
    num_rows, num_voters, num_q_heads, dim = voters.shape
    _, heads, block_size, kdim = key_cache.shape
    if kdim != dim or num_q_heads % heads:
        raise ValueError(f"voters [.., {num_q_heads}, {dim}] do not match a cache of "
                         f"{heads} heads of {kdim}")
    dev = key_cache.device
    pooled = chunk_base is not None or layer_base != 0
    tables, pooled_strides = _event_tables(rows, page_start, kept_counts, block_table,
                                           chunk_base, capacity, layer_base, num_rows, dev)
    page_start, kept_counts, block_table, rows = tables[:4]
    if voters.dtype == torch.float64:
        raise ValueError("float64 voters: use decode_voter_probs_event_reference")
    group = num_q_heads // heads
    out = torch.zeros(num_rows, heads, group * num_voters, width + window,
                      dtype=torch.float32, device=dev)
    if num_rows == 0 or num_voters == 0:
        return out
    voters = voters.to(dev)

    block_g, block_w, pages, block_n = _tiles(group, num_voters, block_size)
    v_blocks = triton.cdiv(num_voters, block_w)
    if num_splits is None:
        num_splits = default_num_splits(heads * v_blocks, dev)
    num_splits = max(1, min(int(num_splits), MAX_SPLITS))
    stats_m = torch.empty(num_rows, num_splits, num_q_heads, num_voters, dtype=torch.float32,
                          device=dev)
    stats_l = torch.empty_like(stats_m)
    dot_fp32 = dev.type != "cuda" or voters.dtype == torch.float32
    ks = scale_operand(k_scale, key_cache, rows)
    qk_scale = float(scale) * _LOG2E
    strides = (*voters.stride(), *key_cache.stride(), *page_start.stride(),
               *kept_counts.stride(), *block_table.stride(), *pooled_strides)
    common = dict(NUM_KV_HEADS=heads, GROUP=group, VOTERS=num_voters, BLOCK_SIZE=block_size,
                  HEAD_DIM=dim, PAGES=pages, BLOCK_G=block_g, BLOCK_W=block_w,
                  BLOCK_N=block_n, BLOCK_D=block_d_of(dim), POOLED=pooled,
                  DOT_FP32=dot_fp32, KV_FP8=is_fp8(key_cache.dtype))
    _decode_voter_stats[(num_rows, heads * v_blocks, num_splits)](
        voters, key_cache, ks, *tables, stats_m, stats_l,
        qk_scale, num_splits, int(layer_base), *strides, **common)
    key_tiles = triton.cdiv(width + window, pages * block_size)
    _decode_voter_probs[(num_rows * heads * v_blocks, key_tiles)](
        voters, key_cache, ks, *tables, stats_m, stats_l, out,
        qk_scale, num_splits, int(layer_base), width, *strides, *out.stride()[:3],
        WINDOW=window, BLOCK_S=MAX_SPLITS, **common)
    return out
