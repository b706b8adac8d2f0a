"""Ada-KV's safeguarded allocation (hits per head -> kept candidates per head): one program.

One kernel for both contracts: ``kernels.allocation.safeguard_caps_reference`` (the
prompt: every head of a row has ``C`` candidates, ``T = H * s``) and
``safeguard_caps_heads_reference`` (decode events: per-head upper bounds ``n[r, h]``,
totals ``T[r]`` on the device). The prompt is the case ``n[r, h] = C_r``: ``T / H = s``
exactly, so both give the same quotas. The references take about 75 tiny torch launches
on ``[H]`` vectors per row (each a few microseconds of GPU time, and more of host time).
Here one program per row: the two largest-remainder passes run over a ``[H, H]`` tile: a
head's position in an ordering is the number of heads that precede it, and a cumsum in
that order is a masked row sum.

Integer-exact against the references: quotas in fp64 from fp64 inputs (``params`` holds
``alpha`` and ``1 - alpha``; ``T / H`` is an IEEE division), each product rounded on its
own as torch does (launched with ``enable_fp_fusion=False``: a fused multiply-add would
round ``alpha * share + (1 - alpha) * hits`` once and could move a floor or a tie).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_adakv.kernels.allocation import check_heads_inputs
from vllm_adakv.kernels.jit import jit_unspecialized
from vllm_adakv.tensors import on_device

# Launch options of ``_safeguard_caps`` (``tests/kernels/sm90_compile.py`` compiles with them).
EXACT_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _spread(amount, room, key0, key1, valid, BLOCK_H: tl.constexpr):
    """Units of ``amount`` per head: one to each head with room in the order (key0 desc,
    key1 desc, head asc) while units last, then greedily up to each head's room."""
    idx = tl.arange(0, BLOCK_H)
    k0_h, k0_j = key0[:, None], key0[None, :]
    k1_h, k1_j = key1[:, None], key1[None, :]
    # before[h, j]: head j comes before head h.
    before = (k0_j > k0_h) | ((k0_j == k0_h) & ((k1_j > k1_h) | ((k1_j == k1_h)
                                                                 & (idx[None, :] < idx[:, None]))))
    before = before & valid[None, :]
    upto = before | (idx[None, :] == idx[:, None])
    has = ((room > 0) & valid).to(tl.int64)
    first = has * (tl.sum(tl.where(upto, has[None, :], 0), 1) <= amount).to(tl.int64)
    rest = amount - tl.sum(first, 0)
    left = tl.where(valid, room - first, 0)
    ahead = tl.sum(tl.where(before, left[None, :], 0), 1)
    more = tl.minimum(tl.maximum(rest - ahead, 0), left)
    return first + more


@jit_unspecialized(ints=["num_heads", "stride_br", "stride_bh"],
                   pointers=["totals_ptr", "bounds_ptr"])
def _safeguard_caps(hits_ptr, totals_ptr, bounds_ptr, stride_br, stride_bh, params_ptr,
                    out_ptr, num_heads, BLOCK_H: tl.constexpr):
    row = tl.program_id(0)
    idx = tl.arange(0, BLOCK_H)
    valid = idx < num_heads
    hits = tl.load(hits_ptr + row * num_heads + idx, mask=valid, other=0).to(tl.int64)
    upper = tl.load(bounds_ptr + row * stride_br + idx * stride_bh, mask=valid,
                    other=0).to(tl.int64)
    total = tl.load(totals_ptr + row).to(tl.int64)
    alpha = tl.load(params_ptr)
    keep_share = tl.load(params_ptr + 1)
    alpha_share = alpha * (total.to(tl.float64) / num_heads.to(tl.float64))
    quota = alpha_share + keep_share * hits.to(tl.float64)
    lower = tl.minimum(tl.floor(alpha_share).to(tl.int64), upper)
    caps = tl.maximum(tl.minimum(tl.floor(quota).to(tl.int64), upper), lower)
    frac = quota - caps.to(tl.float64)
    diff = total - tl.sum(tl.where(valid, caps, 0), 0)
    give = _spread(tl.maximum(diff, 0), upper - caps, frac, hits.to(tl.float64),
                   valid, BLOCK_H)
    take = _spread(tl.maximum(-diff, 0), caps - lower, (caps - lower).to(tl.float64), -frac,
                   valid, BLOCK_H)
    tl.store(out_ptr + row * num_heads + idx, caps + give - take, mask=valid)


def _launch(hits: torch.Tensor, totals: torch.Tensor, bounds: torch.Tensor,
            alpha: float) -> torch.Tensor:
    """One program per row of int64 ``hits`` ``[R, H]``; ``totals`` contiguous int64
    ``[R]``, ``bounds`` int64 ``[R, H]`` (any strides)."""
    rows, num_heads = hits.shape
    params = on_device([alpha, 1.0 - alpha], torch.float64, hits.device)
    out = torch.empty(rows, num_heads, dtype=torch.int64, device=hits.device)
    if rows == 0:
        return out
    _safeguard_caps[(rows,)](hits.contiguous(), totals, bounds, bounds.stride(0),
                             bounds.stride(1), params, out, num_heads,
                             BLOCK_H=triton.next_power_of_2(num_heads), **EXACT_OPTIONS)
    return out


def safeguard_caps_triton(hits: torch.Tensor, selectable: list[int], alpha: float,
                          num_candidates: list[int]) -> torch.Tensor:
    """Kept candidates per head (int64 ``[R, H]``); contract of
    ``kernels.allocation.safeguard_caps_reference``. One program per row."""
    rows, num_heads = hits.shape
    # Row 0: the totals H * s; row 1: the candidate counts C (every head's bound).
    ints = on_device([[num_heads * s for s in selectable], list(num_candidates)],
                     torch.int64, hits.device)
    return _launch(hits.long(), ints[0], ints[1][:, None].expand(rows, num_heads),
                   float(alpha))


def safeguard_caps_heads_triton(hits: torch.Tensor, totals: torch.Tensor, alpha: float,
                                num_candidates: torch.Tensor) -> torch.Tensor:
    """Kept candidates per head (int64 ``[R, H]``) under per-head upper bounds; contract of
    ``kernels.allocation.safeguard_caps_heads_reference``. One program per row, no host
    sync: ``totals`` in ``[0, sum_h num_candidates]`` and hits are not checked on the
    device (that would read them back)."""
    alpha = check_heads_inputs(hits, totals, alpha, num_candidates)
    return _launch(hits.long(), totals.long().contiguous(), num_candidates.long(), alpha)
