"""GVote's vote at the end of prefill: Triton kernels, for all requests of a layer at once.

Same signatures and results as ``voting.voter_probs_reference`` and
``voting.min_mass_above_reference``.

* Voter attention reuses the scoring pass: ``triton_scoring._window_stats`` with
  ``CAUSAL=False`` (voters see the whole prompt) gives each voter's running max and sum
  of exponentials over split position ranges of the paged keys; ``_voter_probs``, grid
  ``(R * H, cdiv(Lmax, BLOCK_N))``, reads one tile of keys once and writes the softmax
  probabilities of all ``G * V`` voters of its KV head for it. Keys are read in place
  (no gathered copy of the prompt).
* Nucleus without a full sort: the selection only ever reads ``c*`` below the nucleus
  mass or within the cap of ``most`` tokens, so each voter needs just its ``most``
  largest probabilities (a ``torch.topk``; a sort only when ``most`` is over half the
  prompt). ``_min_mass_above``, grid ``(R * H, cdiv(Lmax, BLOCK_N))``, finds each key's
  rank in every voter's ascending top list by binary search, reads the mass above that
  rank and keeps the least over the voters: no ``[.., Lmax]`` index tensor, no scatter.
  Nothing is read back to the host.

fp8 key caches as in ``triton_scoring`` (``KV_FP8``): keys cast to the voters' dtype
(exact), the scale folded into the logit scale.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vllm_adakv.kernels.fp8 import is_fp8, scale_operand
from vllm_adakv.kernels.jit import jit_unspecialized
from vllm_adakv.kernels.triton_scoring import (
    _LOG2E,
    BLOCK_N,
    MAX_SPLITS,
    _load_keys_t,
    _logit_scale,
    _row_of,
    _tile_probs,
    block_d_of,
    query_stats,
)
from vllm_adakv.kernels.voting import top_mass_lists
from vllm_adakv.tensors import on_device


@jit_unspecialized(ints=["num_splits", "stride_br", "stride_or", "stride_oh", "stride_ov"],
                   pointers=["ks_ptr"])
def _voter_probs(
    q_ptr, k_ptr, ks_ptr, bt_ptr, meta_ptr, m_ptr, l_ptr, out_ptr,
    qk_scale, num_splits,
    stride_qr, stride_qv, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_br, stride_or, stride_oh, stride_ov,
    NUM_KV_HEADS: tl.constexpr,
    NUM_VOTERS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr = False,
):
    r = tl.program_id(0) // NUM_KV_HEADS
    kv_head = tl.program_id(0) % NUM_KV_HEADS
    num_q_heads = NUM_KV_HEADS * GROUP
    prompt_len, bid_ptr, q_ptr = _row_of(meta_ptr, r, stride_br, bt_ptr, q_ptr, stride_qr)
    qk_scale = _logit_scale(qk_scale, ks_ptr, KV_FP8)
    pos = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if tl.program_id(1) * BLOCK_N < prompt_len:  # the output starts as zeros
        offs_d = tl.arange(0, BLOCK_D)
        mask_n = pos < prompt_len
        mask_d = offs_d < HEAD_DIM
        kt = _load_keys_t(k_ptr, bid_ptr, kv_head, pos, mask_n, offs_d, mask_d,
                          stride_kb, stride_kh, stride_kn, stride_kd, BLOCK_SIZE, q_ptr, KV_FP8)
        out_ptr += r.to(tl.int64) * stride_or + kv_head * stride_oh
        for g in range(GROUP):
            q_head = kv_head * GROUP + g
            for v0 in range(0, NUM_VOTERS, BLOCK_V):
                offs_v = v0 + tl.arange(0, BLOCK_V)
                mask_v = offs_v < NUM_VOTERS
                p = _tile_probs(q_ptr, m_ptr, l_ptr, kt, r, q_head, num_q_heads, offs_v,
                                mask_v, offs_d, mask_d, num_splits, qk_scale, stride_qv,
                                stride_qh, stride_qd, NUM_VOTERS, BLOCK_S, DOT_FP32,
                                PRECISION)
                voter = g * NUM_VOTERS + offs_v
                tl.store(out_ptr + voter[:, None] * stride_ov + pos[None, :], p,
                         mask=mask_v[:, None] & mask_n[None, :])


@jit_unspecialized(ints=["num_voters", "top_m", "num_iters", "stride_pr", "stride_ar",
                         "stride_br", "stride_or"])
def _min_mass_above(
    probs_ptr, asc_ptr, before_ptr, len_ptr, out_ptr,
    num_voters, top_m, num_iters,
    stride_pr, stride_ar, stride_br, stride_or,
    NUM_KV_HEADS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rh = tl.program_id(0)
    r = rh // NUM_KV_HEADS
    pos = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = pos < tl.load(len_ptr + r)
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    for j in range(num_voters):
        row = rh.to(tl.int64) * num_voters + j
        p = tl.load(probs_ptr + row * stride_pr + pos, mask=mask, other=0.0)
        asc = asc_ptr + row * stride_ar
        # lo = number of top values <= p (torch.searchsorted(..., right=True))
        lo = tl.zeros([BLOCK_N], tl.int32)
        hi = tl.full([BLOCK_N], top_m, tl.int32)
        for _ in range(num_iters):
            active = lo < hi
            mid = (lo + hi) // 2
            v = tl.load(asc + mid, mask=mask & active, other=0.0)
            right = v <= p
            lo = tl.where(active & right, mid + 1, lo)
            hi = tl.where(active & (v > p), mid, hi)
        mass = tl.load(before_ptr + row * stride_br + (top_m - lo), mask=mask, other=0.0)
        in_top = p >= tl.load(asc)
        best = tl.minimum(best, tl.where(in_top, mass, float("inf")))
    tl.store(out_ptr + rh.to(tl.int64) * stride_or + pos, tl.where(mask, best, float("inf")),
             mask=pos < stride_or)


def voter_probs_triton(
    voters: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    block_rows: list[int],
    prompt_lens: list[int],
    scale: float,
    *,
    num_splits: int | None = None,
    precision: str = "tf32x3",
    k_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[R, H, G * V, Lmax]`` fp32 voter attention; contract of
    ``voting.voter_probs_reference`` (``k_scale``: an fp8 key cache's scale, on its
    device). float32 voters are dotted in float32 with Triton's ``input_precision``
    ``precision``; other voters in the keys' dtype (an fp8 cache's keys in the voters'
    dtype)."""
    rows, num_voters, num_q_heads, dim = voters.shape
    _, heads, block_size, kdim = key_cache.shape
    assert kdim == dim and num_q_heads % heads == 0 and min(prompt_lens) >= 1
    assert len(block_rows) == len(prompt_lens) == rows
    group = num_q_heads // heads
    dev = voters.device
    block_table = block_table.to(dev)
    longest = max(prompt_lens)
    meta = on_device([[b, n] for b, n in zip(block_rows, prompt_lens, strict=True)],
                     torch.int32, dev)
    out = torch.zeros(rows, heads, group * num_voters, longest, dtype=torch.float32,
                      device=dev)
    dot_fp32 = dev.type != "cuda" or voters.dtype == torch.float32
    kv_fp8 = is_fp8(key_cache.dtype)
    if not dot_fp32 and not kv_fp8:
        voters = voters.to(key_cache.dtype)
    qk_scale = float(scale) * _LOG2E
    stats_m, stats_l, num_splits, block_v = query_stats(
        voters, key_cache, block_table, meta, qk_scale, num_splits, causal=False,
        dot_fp32=dot_fp32, precision=precision, k_scale=k_scale)
    _voter_probs[(rows * heads, triton.cdiv(longest, BLOCK_N))](
        voters, key_cache, scale_operand(k_scale, key_cache, meta), block_table, meta,
        stats_m, stats_l, out, qk_scale, num_splits,
        *voters.stride(), *key_cache.stride(), block_table.stride(0), *out.stride()[:3],
        NUM_KV_HEADS=heads, NUM_VOTERS=num_voters, GROUP=group, BLOCK_SIZE=block_size,
        HEAD_DIM=dim, BLOCK_V=block_v, BLOCK_N=BLOCK_N, BLOCK_D=block_d_of(dim),
        BLOCK_S=MAX_SPLITS, DOT_FP32=dot_fp32, PRECISION=precision, KV_FP8=kv_fp8,
    )
    return out


def min_mass_above_triton(probs: torch.Tensor, prompt_lens: list[int], nucleus_p: float,
                          most: int) -> torch.Tensor:
    """``c*`` ``[R, H, Lmax]`` (fp32, ``inf`` beyond each prompt); contract of
    ``voting.min_mass_above_reference``, from each voter's top ``most`` only."""
    rows, heads, num_voters, width = probs.shape
    probs = probs.float().contiguous()
    m = max(1, min(int(most), width))
    asc, before = top_mass_lists(probs, m)
    out = torch.empty(rows, heads, width, dtype=torch.float32, device=probs.device)
    lengths = on_device(prompt_lens, torch.int32, probs.device)
    _min_mass_above[(rows * heads, triton.cdiv(width, BLOCK_N))](
        probs, asc, before, lengths, out, num_voters, m, max(1, math.ceil(math.log2(m + 1))),
        width, m, m + 1, width, NUM_KV_HEADS=heads, BLOCK_N=BLOCK_N,
    )
    return out
