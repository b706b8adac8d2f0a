"""Scoring at the end of prefill: Triton kernels.

Same signature and result as ``scoring.score_window_reference``. Two passes so
that no ``window x prompt x heads`` tensor is ever materialised:

* ``_window_stats``, grid ``(Hq, cdiv(w, BLOCK_W))``: for each window query, the
  running max and sum of exponentials of its logits over all prompt keys
  (causal inside the window), read from the paged cache through the block ids.
* ``_candidate_scores``, grid ``(H, cdiv(L - w, BLOCK_N))``: for a tile of
  candidate keys, each window query's softmax probability (from the stats),
  summed over the window, then reduced over the GQA group (mean or max).
  Candidates precede every window query, so no causal mask is needed there.

Memory: two ``[Hq, w]`` fp32 vectors plus the ``[H, L - w]`` output. Pooling
along positions then runs in torch on that output (one small op).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_adakv.kernels.scoring import pool_scores

_LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _load_keys_t(k_ptr, bid_ptr, kv_head, pos, mask_n, offs_d, mask_d,
                 stride_kb, stride_kh, stride_kn, stride_kd, BLOCK_SIZE: tl.constexpr):
    """Keys of positions ``pos`` of one KV head as a ``[BLOCK_D, BLOCK_N]`` tile."""
    blk = tl.load(bid_ptr + pos // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
    addr = (k_ptr + blk[None, :] * stride_kb + kv_head * stride_kh
            + (pos % BLOCK_SIZE)[None, :] * stride_kn + offs_d[:, None] * stride_kd)
    return tl.load(addr, mask=mask_d[:, None] & mask_n[None, :], other=0.0)


@triton.jit
def _window_stats(
    q_ptr, k_ptr, bid_ptr, m_ptr, l_ptr,
    qk_scale, prompt_len,
    stride_qw, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    WINDOW: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    q_head = tl.program_id(0)
    kv_head = q_head // GROUP
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_w = offs_w < WINDOW
    mask_d = offs_d < HEAD_DIM
    q = tl.load(q_ptr + offs_w[:, None] * stride_qw + q_head * stride_qh
                + offs_d[None, :] * stride_qd, mask=mask_w[:, None] & mask_d[None, :], other=0.0)
    q_pos = prompt_len - WINDOW + offs_w
    m_i = tl.full([BLOCK_W], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_W], tl.float32)
    for n0 in range(0, prompt_len, BLOCK_N):
        pos = n0 + offs_n
        mask_n = pos < prompt_len
        kt = _load_keys_t(k_ptr, bid_ptr, kv_head, pos, mask_n, offs_d, mask_d,
                          stride_kb, stride_kh, stride_kn, stride_kd, BLOCK_SIZE)
        s = _dot(q, kt, DOT_FP32) * qk_scale
        valid = mask_w[:, None] & mask_n[None, :] & (pos[None, :] <= q_pos[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    tl.store(m_ptr + q_head * WINDOW + offs_w, m_i, mask=mask_w)
    tl.store(l_ptr + q_head * WINDOW + offs_w, l_i, mask=mask_w)


@triton.jit
def _candidate_scores(
    q_ptr, k_ptr, bid_ptr, m_ptr, l_ptr, out_ptr,
    qk_scale, num_candidates,
    stride_qw, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_oh,
    WINDOW: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    REDUCE_MAX: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    kv_head = tl.program_id(0)
    pos = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = pos < num_candidates
    mask_d = offs_d < HEAD_DIM
    kt = _load_keys_t(k_ptr, bid_ptr, kv_head, pos, mask_n, offs_d, mask_d,
                      stride_kb, stride_kh, stride_kn, stride_kd, BLOCK_SIZE)
    reduced = tl.zeros([BLOCK_N], tl.float32)
    for g in range(GROUP):
        q_head = kv_head * GROUP + g
        col = tl.zeros([BLOCK_N], tl.float32)
        for w0 in range(0, WINDOW, BLOCK_W):
            offs_w = w0 + tl.arange(0, BLOCK_W)
            mask_w = offs_w < WINDOW
            q = tl.load(q_ptr + offs_w[:, None] * stride_qw + q_head * stride_qh
                        + offs_d[None, :] * stride_qd,
                        mask=mask_w[:, None] & mask_d[None, :], other=0.0)
            m = tl.load(m_ptr + q_head * WINDOW + offs_w, mask=mask_w, other=0.0)
            den = tl.load(l_ptr + q_head * WINDOW + offs_w, mask=mask_w, other=1.0)
            s = _dot(q, kt, DOT_FP32) * qk_scale
            p = tl.exp2(s - m[:, None]) / den[:, None]
            col += tl.sum(tl.where(mask_w[:, None], p, 0.0), 0)
        if REDUCE_MAX:
            reduced = tl.maximum(reduced, col)
        else:
            reduced += col / GROUP
    tl.store(out_ptr + kv_head * stride_oh + pos, reduced, mask=mask_n)


def score_window_triton(
    window_query: torch.Tensor,
    key_cache: torch.Tensor,
    block_ids: torch.Tensor,
    prompt_len: int,
    scale: float,
    *,
    gqa_reduce: str,
    pooling: str,
    pool_kernel: int,
) -> torch.Tensor:
    """SnapKV scores ``[H, prompt_len - w]`` (fp32); contract of ``score_window_reference``."""
    if gqa_reduce not in ("mean", "max"):
        raise ValueError(f"unknown gqa_reduce {gqa_reduce!r}")
    window, num_q_heads, dim = window_query.shape
    _, heads, block_size, kdim = key_cache.shape
    assert kdim == dim and num_q_heads % heads == 0 and prompt_len > window
    group = num_q_heads // heads
    dev = window_query.device
    block_ids = block_ids.to(dev)
    stats_m = torch.empty(num_q_heads, window, dtype=torch.float32, device=dev)
    stats_l = torch.empty_like(stats_m)
    candidates = prompt_len - window
    out = torch.empty(heads, candidates, dtype=torch.float32, device=dev)
    block_w = max(16, min(64, triton.next_power_of_2(window)))
    block_n = 64
    block_d = max(16, triton.next_power_of_2(dim))
    dot_fp32 = dev.type != "cuda" or window_query.dtype == torch.float32
    qk_scale = float(scale) * _LOG2E
    common = dict(WINDOW=window, GROUP=group, BLOCK_SIZE=block_size, HEAD_DIM=dim,
                  BLOCK_W=block_w, BLOCK_N=block_n, BLOCK_D=block_d, DOT_FP32=dot_fp32)
    _window_stats[(num_q_heads, triton.cdiv(window, block_w))](
        window_query, key_cache, block_ids, stats_m, stats_l, qk_scale, prompt_len,
        *window_query.stride(), *key_cache.stride(), **common,
    )
    _candidate_scores[(heads, triton.cdiv(candidates, block_n))](
        window_query, key_cache, block_ids, stats_m, stats_l, out, qk_scale, candidates,
        *window_query.stride(), *key_cache.stride(), out.stride(0),
        REDUCE_MAX=gqa_reduce == "max", **common,
    )
    return pool_scores(out, pooling, pool_kernel)
