"""Scoring at the end of prefill: Triton kernels.

Same signature and result as ``scoring.score_window_reference``. Two passes so
that no ``window x prompt x heads`` tensor is ever materialised:

* ``_window_stats``, grid ``(Hq, cdiv(w, BLOCK_W), S)``: for each window query,
  the running max and sum of exponentials of its logits over the keys of one
  of ``S`` contiguous position ranges (causal inside the window), read from the
  paged cache through the block ids. ``S`` splits the prompt so that the grid
  fills the device (one program per query head would leave most SMs idle and
  walk the whole prompt serially).
* ``_candidate_scores``, grid ``(H, cdiv(L - w, BLOCK_N))``: combines the ``S``
  partial statistics of each window query, then, for a tile of candidate keys,
  each window query's softmax probability, summed over the window and reduced
  over the GQA group (mean or max). Candidates precede every window query, so
  no causal mask is needed there.

Memory: two ``[S, Hq, w]`` fp32 tensors plus the ``[H, L - w]`` output. Pooling
along positions then runs in torch on that output (one small op). Prompt
lengths are not specialised on (``jit.jit_unspecialized``): one compiled
variant serves every request.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_adakv.kernels.jit import jit_unspecialized
from vllm_adakv.kernels.scoring import pool_scores

_LOG2E = 1.4426950408889634
# Most position splits of the window statistics (also the width of their combine tile,
# fixed so that one compiled variant serves every split count).
MAX_SPLITS = 64


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


@jit_unspecialized(ints=["prompt_len", "num_splits"], pointers=["bid_ptr"])
def _window_stats(
    q_ptr, k_ptr, bid_ptr, m_ptr, l_ptr,
    qk_scale, prompt_len, num_splits,
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
    split = tl.program_id(2)
    num_q_heads = tl.num_programs(0)
    kv_head = q_head // GROUP
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
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
                          stride_kb, stride_kh, stride_kn, stride_kd, BLOCK_SIZE)
        s = _dot(q, kt, DOT_FP32) * qk_scale
        valid = mask_w[:, None] & mask_n[None, :] & (pos[None, :] <= q_pos[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    stat = (split * num_q_heads + q_head) * WINDOW + offs_w
    tl.store(m_ptr + stat, m_i, mask=mask_w)
    tl.store(l_ptr + stat, l_i, mask=mask_w)


@triton.jit
def _combined_stats(m_ptr, l_ptr, q_head, num_q_heads, offs_w, mask_w, num_splits,
                    WINDOW: tl.constexpr, BLOCK_S: tl.constexpr):
    """Max and sum of exponentials over all splits of the window queries ``offs_w``."""
    offs_s = tl.arange(0, BLOCK_S)
    mask = (offs_s < num_splits)[:, None] & mask_w[None, :]
    idx = (offs_s[:, None] * num_q_heads + q_head) * WINDOW + offs_w[None, :]
    m_s = tl.load(m_ptr + idx, mask=mask, other=float("-inf"))
    l_s = tl.load(l_ptr + idx, mask=mask, other=0.0)
    m = tl.max(m_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return m, tl.sum(l_s * tl.exp2(m_s - m_safe[None, :]), 0)


@jit_unspecialized(ints=["num_candidates", "num_splits", "stride_oh"], pointers=["bid_ptr"])
def _candidate_scores(
    q_ptr, k_ptr, bid_ptr, m_ptr, l_ptr, out_ptr,
    qk_scale, num_candidates, num_splits,
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
    BLOCK_S: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    kv_head = tl.program_id(0)
    num_q_heads = tl.num_programs(0) * GROUP
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
            m, den = _combined_stats(m_ptr, l_ptr, q_head, num_q_heads, offs_w, mask_w,
                                     num_splits, WINDOW, BLOCK_S)
            den = tl.where(mask_w, den, 1.0)
            s = _dot(q, kt, DOT_FP32) * qk_scale
            p = tl.exp2(s - m[:, None]) / den[:, None]
            col += tl.sum(tl.where(mask_w[:, None], p, 0.0), 0)
        if REDUCE_MAX:
            reduced = tl.maximum(reduced, col)
        else:
            reduced += col / GROUP
    tl.store(out_ptr + kv_head * stride_oh + pos, reduced, mask=mask_n)


def default_num_splits(num_programs: int, prompt_len: int, block_n: int,
                       device: torch.device) -> int:
    """Position splits of the window statistics: enough programs to fill the device,
    at least four key tiles per split. A power of two (few compiled variants)."""
    from vllm_adakv.kernels.triton_decode import num_programs_target

    want = triton.cdiv(num_programs_target(device), max(num_programs, 1))
    most = max(1, triton.cdiv(prompt_len, 4 * block_n))
    splits = max(1, min(want, most, MAX_SPLITS))
    return 1 << (splits.bit_length() - 1)


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
    num_splits: int | None = None,
) -> torch.Tensor:
    """SnapKV scores ``[H, prompt_len - w]`` (fp32); contract of ``score_window_reference``.

    ``num_splits`` position ranges for the window statistics (default: from shapes)."""
    if gqa_reduce not in ("mean", "max"):
        raise ValueError(f"unknown gqa_reduce {gqa_reduce!r}")
    window, num_q_heads, dim = window_query.shape
    _, heads, block_size, kdim = key_cache.shape
    assert kdim == dim and num_q_heads % heads == 0 and prompt_len > window
    group = num_q_heads // heads
    dev = window_query.device
    block_ids = block_ids.to(dev)
    candidates = prompt_len - window
    out = torch.empty(heads, candidates, dtype=torch.float32, device=dev)
    block_w = max(16, min(64, triton.next_power_of_2(window)))
    block_n = 64
    w_blocks = triton.cdiv(window, block_w)
    if num_splits is None:
        num_splits = default_num_splits(num_q_heads * w_blocks, prompt_len, block_n, dev)
    num_splits = max(1, min(int(num_splits), MAX_SPLITS))
    stats_m = torch.empty(num_splits, num_q_heads, window, dtype=torch.float32, device=dev)
    stats_l = torch.empty_like(stats_m)
    block_d = max(16, triton.next_power_of_2(dim))
    dot_fp32 = dev.type != "cuda" or window_query.dtype == torch.float32
    qk_scale = float(scale) * _LOG2E
    common = dict(WINDOW=window, GROUP=group, BLOCK_SIZE=block_size, HEAD_DIM=dim,
                  BLOCK_W=block_w, BLOCK_N=block_n, BLOCK_D=block_d, DOT_FP32=dot_fp32)
    _window_stats[(num_q_heads, w_blocks, num_splits)](
        window_query, key_cache, block_ids, stats_m, stats_l, qk_scale, prompt_len,
        num_splits, *window_query.stride(), *key_cache.stride(), **common,
    )
    _candidate_scores[(heads, triton.cdiv(candidates, block_n))](
        window_query, key_cache, block_ids, stats_m, stats_l, out, qk_scale, candidates,
        num_splits, *window_query.stride(), *key_cache.stride(), out.stride(0),
        REDUCE_MAX=gqa_reduce == "max", BLOCK_S=MAX_SPLITS, **common,
    )
    return pool_scores(out, pooling, pool_kernel)
