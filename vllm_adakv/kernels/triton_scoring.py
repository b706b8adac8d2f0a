"""Scoring at the end of prefill: Triton kernels, for all requests of a layer at once.

Same signature and result as ``scoring.score_windows_reference``. Two passes so
that no ``window x prompt x heads`` tensor is ever materialised:

* ``_window_stats``, grid ``(Hq, R * cdiv(w, BLOCK_W), S)``: for each window
  query of each request row, the running max and sum of exponentials of its
  logits over the keys of one of ``S`` contiguous position ranges (causal inside
  the window), read from the paged cache through the row's block ids. ``S``
  splits the prompt so that the grid fills the device (one program per query
  head would leave most SMs idle and walk the whole prompt serially). With
  ``CAUSAL=False`` it serves queries that see the whole prompt (GVote's voters,
  ``triton_voting``).
* ``_candidate_scores``, grid ``(R * H, cdiv(Lmax - w, BLOCK_N))``: combines the
  ``S`` partial statistics of each window query, then, for a tile of candidate
  keys, each window query's softmax probability, summed over the window and
  reduced over the GQA group (mean or max). Candidates precede every window
  query, so no causal mask is needed there.

A row table (block-table row, prompt length) gives each request its own length:
one launch pair serves every request whose prompt completes in the step, and
nothing about a length is compiled in (``jit.jit_unspecialized``). Memory: two
``[R, S, Hq, w]`` fp32 tensors plus the ``[R, H, Lmax - w]`` output (padding -inf).
Pooling along positions then runs in torch on that output.

fp8 key caches (``KV_FP8``, from the cache dtype; ``kernels.fp8``): key tiles are cast to
the queries' dtype (exact) and the scale, loaded from its one-element tensor, is folded
into the logit scale. Other caches compile the same code as before (``KV_FP8`` False,
the scale pointer never read).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_adakv.kernels.fp8 import is_fp8, scale_operand
from vllm_adakv.kernels.jit import jit_unspecialized
from vllm_adakv.kernels.scoring import pool_rows
from vllm_adakv.tensors import on_device

_LOG2E = 1.4426950408889634
BLOCK_N = 64  # keys per tile
# Most position splits of the window statistics (also the width of their combine tile,
# fixed so that one compiled variant serves every split count).
MAX_SPLITS = 64


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    # One return after the branch: Triton's code generator keeps visiting the statements
    # after a return inside a compile-time ``if`` (the interpreter does not), so an
    # early return would also compile the other dot (and fail on mixed dtypes).
    if DOT_FP32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _load_keys_t(k_ptr, bid_ptr, kv_head, pos, mask_n, offs_d, mask_d,
                 stride_kb, stride_kh, stride_kn, stride_kd, BLOCK_SIZE: tl.constexpr,
                 q_ptr, KV_FP8: tl.constexpr):
    """Keys of positions ``pos`` of one KV head as a ``[BLOCK_D, BLOCK_N]`` tile; fp8 keys
    in the queries' dtype (exact; the scale is applied to the logits)."""
    blk = tl.load(bid_ptr + pos // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
    addr = (k_ptr + blk[None, :] * stride_kb + kv_head * stride_kh
            + (pos % BLOCK_SIZE)[None, :] * stride_kn + offs_d[:, None] * stride_kd)
    kt = tl.load(addr, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
    if KV_FP8:
        kt = kt.to(q_ptr.dtype.element_ty)
    return kt


@triton.jit
def _logit_scale(qk_scale, ks_ptr, KV_FP8: tl.constexpr):
    """The logits' scale: ``qk_scale``, times the key cache's scale for fp8 keys."""
    if KV_FP8:
        qk_scale = qk_scale * tl.load(ks_ptr)
    return qk_scale


@triton.jit
def _row_of(meta_ptr, r, stride_br, bt_ptr, q_ptr, stride_qr):
    """Prompt length, block-id row and window queries of request row ``r``."""
    block_row = tl.load(meta_ptr + 2 * r).to(tl.int64)
    prompt_len = tl.load(meta_ptr + 2 * r + 1)
    return prompt_len, bt_ptr + block_row * stride_br, q_ptr + r.to(tl.int64) * stride_qr


@jit_unspecialized(ints=["num_splits", "stride_br"], pointers=["ks_ptr"])
def _window_stats(
    q_ptr, k_ptr, ks_ptr, bt_ptr, meta_ptr, m_ptr, l_ptr,
    qk_scale, num_splits,
    stride_qr, stride_qw, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_br,
    WINDOW: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    CAUSAL: tl.constexpr = True,
    PRECISION: tl.constexpr = "ieee",
    KV_FP8: tl.constexpr = False,
):
    W_BLOCKS: tl.constexpr = (WINDOW + BLOCK_W - 1) // BLOCK_W
    q_head = tl.program_id(0)
    r = tl.program_id(1) // W_BLOCKS
    split = tl.program_id(2)
    num_q_heads = tl.num_programs(0)
    kv_head = q_head // GROUP
    prompt_len, bid_ptr, q_ptr = _row_of(meta_ptr, r, stride_br, bt_ptr, q_ptr, stride_qr)
    qk_scale = _logit_scale(qk_scale, ks_ptr, KV_FP8)
    offs_w = (tl.program_id(1) % W_BLOCKS) * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_w = offs_w < WINDOW
    mask_d = offs_d < HEAD_DIM
    q = tl.load(q_ptr + offs_w[:, None] * stride_qw + q_head * stride_qh
                + offs_d[None, :] * stride_qd, mask=mask_w[:, None] & mask_d[None, :], other=0.0)
    q_pos = prompt_len - WINDOW + offs_w
    # This split's keys: a whole number of BLOCK_N tiles.
    tiles = (prompt_len + BLOCK_N - 1) // BLOCK_N
    per_split = (tiles + num_splits - 1) // num_splits
    lo = split * per_split * BLOCK_N
    hi = tl.minimum(lo + per_split * BLOCK_N, prompt_len)
    m_i = tl.full([BLOCK_W], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_W], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + offs_n
        mask_n = pos < hi
        kt = _load_keys_t(k_ptr, bid_ptr, kv_head, pos, mask_n, offs_d, mask_d,
                          stride_kb, stride_kh, stride_kn, stride_kd, BLOCK_SIZE, q_ptr, KV_FP8)
        s = _dot(q, kt, DOT_FP32, PRECISION) * qk_scale
        valid = mask_w[:, None] & mask_n[None, :]
        if CAUSAL:
            valid = valid & (pos[None, :] <= q_pos[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    stat = ((r * num_splits + split) * num_q_heads + q_head) * WINDOW + offs_w
    tl.store(m_ptr + stat, m_i, mask=mask_w)
    tl.store(l_ptr + stat, l_i, mask=mask_w)


@triton.jit
def _combined_stats(m_ptr, l_ptr, r, q_head, num_q_heads, offs_w, mask_w, num_splits,
                    WINDOW: tl.constexpr, BLOCK_S: tl.constexpr):
    """Max and sum of exponentials over all splits of row ``r``'s window queries ``offs_w``."""
    offs_s = tl.arange(0, BLOCK_S)
    mask = (offs_s < num_splits)[:, None] & mask_w[None, :]
    idx = ((r * num_splits + offs_s[:, None]) * num_q_heads + q_head) * WINDOW + offs_w[None, :]
    m_s = tl.load(m_ptr + idx, mask=mask, other=float("-inf"))
    l_s = tl.load(l_ptr + idx, mask=mask, other=0.0)
    m = tl.max(m_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return m, tl.sum(l_s * tl.exp2(m_s - m_safe[None, :]), 0)


@triton.jit
def _tile_probs(q_ptr, m_ptr, l_ptr, kt, r, q_head, num_q_heads, offs_w, mask_w, offs_d,
                mask_d, num_splits, qk_scale, stride_qw, stride_qh, stride_qd,
                NUM_QUERIES: tl.constexpr, BLOCK_S: tl.constexpr, DOT_FP32: tl.constexpr,
                PRECISION: tl.constexpr):
    """Softmax probabilities ``[BLOCK_W, BLOCK_N]`` of queries ``offs_w`` of one query head
    against the key tile ``kt``, from the combined split statistics."""
    q = tl.load(q_ptr + offs_w[:, None] * stride_qw + q_head * stride_qh
                + offs_d[None, :] * stride_qd, mask=mask_w[:, None] & mask_d[None, :],
                other=0.0)
    m, den = _combined_stats(m_ptr, l_ptr, r, q_head, num_q_heads, offs_w, mask_w,
                             num_splits, NUM_QUERIES, BLOCK_S)
    den = tl.where(mask_w, den, 1.0)
    s = _dot(q, kt, DOT_FP32, PRECISION) * qk_scale
    return tl.exp2(s - m[:, None]) / den[:, None]


@jit_unspecialized(ints=["num_splits", "stride_br", "stride_or", "stride_oh"],
                   pointers=["ks_ptr"])
def _candidate_scores(
    q_ptr, k_ptr, ks_ptr, bt_ptr, meta_ptr, m_ptr, l_ptr, out_ptr,
    qk_scale, num_splits,
    stride_qr, stride_qw, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_br, stride_or, stride_oh,
    NUM_KV_HEADS: tl.constexpr,
    WINDOW: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    REDUCE_MAX: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr = "ieee",
    KV_FP8: tl.constexpr = False,
):
    r = tl.program_id(0) // NUM_KV_HEADS
    kv_head = tl.program_id(0) % NUM_KV_HEADS
    num_q_heads = NUM_KV_HEADS * GROUP
    prompt_len, bid_ptr, q_ptr = _row_of(meta_ptr, r, stride_br, bt_ptr, q_ptr, stride_qr)
    qk_scale = _logit_scale(qk_scale, ks_ptr, KV_FP8)
    num_candidates = prompt_len - WINDOW
    pos = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if tl.program_id(1) * BLOCK_N < num_candidates:
        offs_d = tl.arange(0, BLOCK_D)
        mask_n = pos < num_candidates
        mask_d = offs_d < HEAD_DIM
        kt = _load_keys_t(k_ptr, bid_ptr, kv_head, pos, mask_n, offs_d, mask_d,
                          stride_kb, stride_kh, stride_kn, stride_kd, BLOCK_SIZE, q_ptr, KV_FP8)
        reduced = tl.zeros([BLOCK_N], tl.float32)
        for g in range(GROUP):
            q_head = kv_head * GROUP + g
            col = tl.zeros([BLOCK_N], tl.float32)
            for w0 in range(0, WINDOW, BLOCK_W):
                offs_w = w0 + tl.arange(0, BLOCK_W)
                mask_w = offs_w < WINDOW
                p = _tile_probs(q_ptr, m_ptr, l_ptr, kt, r, q_head, num_q_heads, offs_w,
                                mask_w, offs_d, mask_d, num_splits, qk_scale, stride_qw,
                                stride_qh, stride_qd, WINDOW, BLOCK_S, DOT_FP32, PRECISION)
                col += tl.sum(tl.where(mask_w[:, None], p, 0.0), 0)
            if REDUCE_MAX:
                reduced = tl.maximum(reduced, col)
            else:
                reduced += col / GROUP
        tl.store(out_ptr + r.to(tl.int64) * stride_or + kv_head * stride_oh + pos, reduced,
                 mask=mask_n)


def default_num_splits(programs_per_row: int, device: torch.device) -> int:
    """Position splits of the window statistics: enough programs for one request to fill
    the device; a power of two. It depends on the model shape only, never on the other
    requests of the step, so a request's scores (and kept set) are the same whichever
    requests it is compressed with."""
    from vllm_adakv.kernels.triton_decode import num_programs_target

    want = triton.cdiv(num_programs_target(device), max(programs_per_row, 1))
    splits = max(1, min(want, MAX_SPLITS))
    return 1 << (splits.bit_length() - 1)


def block_d_of(dim: int) -> int:
    """Head-dim tile: the next power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(dim))


def query_stats(queries: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor,
                meta: torch.Tensor, qk_scale: float, num_splits: int | None, *, causal: bool,
                dot_fp32: bool, precision: str = "ieee", k_scale: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Pass 1 (``_window_stats``) for queries ``[R, Q, Hq, D]`` of the rows in ``meta``:
    per-split max and sum of exponentials ``[R, S, Hq, Q]`` (two tensors), the split count
    ``S`` used and the query tile. ``causal``: query ``i`` sits at position ``L - Q + i``
    (a window); otherwise every query sees the whole prompt. ``k_scale``: an fp8 key
    cache's scale (``kernels.fp8``)."""
    rows, num_queries, num_q_heads, dim = queries.shape
    _, heads, block_size, _ = key_cache.shape
    dev = queries.device
    block_q = max(16, min(64, triton.next_power_of_2(num_queries)))
    q_blocks = triton.cdiv(num_queries, block_q)
    if num_splits is None:
        num_splits = default_num_splits(num_q_heads * q_blocks, dev)
    num_splits = max(1, min(int(num_splits), MAX_SPLITS))
    stats_m = torch.empty(rows, num_splits, num_q_heads, num_queries, dtype=torch.float32,
                          device=dev)
    stats_l = torch.empty_like(stats_m)
    _window_stats[(num_q_heads, rows * q_blocks, num_splits)](
        queries, key_cache, scale_operand(k_scale, key_cache, meta), block_table, meta,
        stats_m, stats_l, qk_scale, num_splits,
        *queries.stride(), *key_cache.stride(), block_table.stride(0), WINDOW=num_queries,
        GROUP=num_q_heads // heads, BLOCK_SIZE=block_size, HEAD_DIM=dim, BLOCK_W=block_q,
        BLOCK_N=BLOCK_N, BLOCK_D=block_d_of(dim), DOT_FP32=dot_fp32, CAUSAL=causal,
        PRECISION=precision, KV_FP8=is_fp8(key_cache.dtype),
    )
    return stats_m, stats_l, num_splits, block_q


def score_windows_triton(
    window_queries: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    block_rows: list[int],
    prompt_lens: list[int],
    scale: float,
    *,
    gqa_reduce: str,
    pooling: str,
    pool_kernel: int,
    num_splits: int | None = None,
    k_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores ``[R, H, Lmax - w]`` (fp32, -inf padding) of ``R`` requests of one layer;
    contract of ``score_windows_reference`` (``k_scale``: an fp8 key cache's scale, on
    its device). ``num_splits`` position ranges for the window statistics (default: from
    shapes)."""
    if gqa_reduce not in ("mean", "max"):
        raise ValueError(f"unknown gqa_reduce {gqa_reduce!r}")
    rows, window, num_q_heads, dim = window_queries.shape
    _, heads, block_size, kdim = key_cache.shape
    assert kdim == dim and num_q_heads % heads == 0 and min(prompt_lens) > window
    assert len(block_rows) == len(prompt_lens) == rows
    group = num_q_heads // heads
    dev = window_queries.device
    block_table = block_table.to(dev)
    longest = max(prompt_lens)
    meta = on_device([[b, n] for b, n in zip(block_rows, prompt_lens, strict=True)],
                     torch.int32, dev)
    out = torch.full((rows, heads, longest - window), float("-inf"), dtype=torch.float32,
                     device=dev)
    dot_fp32 = dev.type != "cuda" or window_queries.dtype == torch.float32
    qk_scale = float(scale) * _LOG2E
    stats_m, stats_l, num_splits, block_w = query_stats(
        window_queries, key_cache, block_table, meta, qk_scale, num_splits, causal=True,
        dot_fp32=dot_fp32, k_scale=k_scale)
    block_n = BLOCK_N
    common = dict(WINDOW=window, GROUP=group, BLOCK_SIZE=block_size, HEAD_DIM=dim,
                  BLOCK_W=block_w, BLOCK_N=block_n, BLOCK_D=block_d_of(dim), DOT_FP32=dot_fp32)
    _candidate_scores[(rows * heads, triton.cdiv(longest - window, block_n))](
        window_queries, key_cache, scale_operand(k_scale, key_cache, meta), block_table,
        meta, stats_m, stats_l, out, qk_scale,
        num_splits, *window_queries.stride(), *key_cache.stride(), block_table.stride(0),
        out.stride(0), out.stride(1), NUM_KV_HEADS=heads, REDUCE_MAX=gqa_reduce == "max",
        BLOCK_S=MAX_SPLITS, KV_FP8=is_fp8(key_cache.dtype), **common,
    )
    return pool_rows(out, [n - window for n in prompt_lens], pooling, pool_kernel)
