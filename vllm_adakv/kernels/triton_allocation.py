"""Ada-KV's safeguarded allocation (hits per head -> kept candidates per head): one program.

Same signature and result as ``kernels.allocation.safeguard_caps_reference``, which
takes about 75 tiny torch launches on ``[H]`` vectors per row (each a few
microseconds of GPU time, and more of host time). Here one program per row: the two
largest-remainder passes run in one program over a ``[H, H]`` tile: a head's
position in an ordering is the number of heads that precede it, and a cumsum in
that order is a masked row sum. Quotas are computed in fp64 from fp64 inputs
(``params`` holds ``alpha * s`` and ``1 - alpha`` of each row), as the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_adakv.kernels.jit import jit_unspecialized
from vllm_adakv.tensors import on_device


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


@jit_unspecialized(ints=["num_heads"])
def _safeguard_caps(hits_ptr, ints_ptr, params_ptr, out_ptr, num_heads,
                    BLOCK_H: tl.constexpr):
    row = tl.program_id(0)
    idx = tl.arange(0, BLOCK_H)
    valid = idx < num_heads
    hits = tl.load(hits_ptr + row * num_heads + idx, mask=valid, other=0).to(tl.int64)
    lower = tl.load(ints_ptr + row * 3)
    num_candidates = tl.load(ints_ptr + row * 3 + 1)
    total = tl.load(ints_ptr + row * 3 + 2)
    alpha_s = tl.load(params_ptr + row * 2)
    keep_share = tl.load(params_ptr + row * 2 + 1)
    quota = alpha_s + keep_share * hits.to(tl.float64)
    caps = tl.floor(quota).to(tl.int64)
    caps = tl.minimum(tl.maximum(caps, lower), num_candidates)
    frac = quota - caps.to(tl.float64)
    diff = total - tl.sum(tl.where(valid, caps, 0), 0)
    give = _spread(tl.maximum(diff, 0), num_candidates - caps, frac, hits.to(tl.float64),
                   valid, BLOCK_H)
    take = _spread(tl.maximum(-diff, 0), caps - lower, (caps - lower).to(tl.float64), -frac,
                   valid, BLOCK_H)
    tl.store(out_ptr + row * num_heads + idx, caps + give - take, mask=valid)


def safeguard_caps_triton(hits: torch.Tensor, selectable: list[int], alpha: float,
                          num_candidates: list[int]) -> torch.Tensor:
    """Kept candidates per head (int64 ``[R, H]``); contract of
    ``kernels.allocation.safeguard_caps_reference``. One program per row."""
    import math

    rows, num_heads = hits.shape
    ints = on_device([[math.floor(alpha * s), c, num_heads * s]
                      for s, c in zip(selectable, num_candidates, strict=True)],
                     torch.int64, hits.device)
    params = on_device([[alpha * s, 1.0 - alpha] for s in selectable], torch.float64,
                       hits.device)
    out = torch.empty(rows, num_heads, dtype=torch.int64, device=hits.device)
    _safeguard_caps[(rows,)](hits.contiguous(), ints, params, out, num_heads,
                             BLOCK_H=triton.next_power_of_2(num_heads))
    return out
