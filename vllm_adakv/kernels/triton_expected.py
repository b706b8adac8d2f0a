"""The expected scorer's per-chunk work in Triton: ``expected.unrotated_sum`` fused.

``sum_p R_p^T q_p`` over a prefill chunk's queries ``[T, Hq, D]`` (after RoPE): the torch
reference gathers the table rows, casts the chunk to fp32 and builds rotated halves, a
few passes over ``T x Hq x D``; here each program reads a tile of ``BLOCK_T`` tokens of one
query head once, rotates it back in registers (fp32) and writes its partial sum; the
partials (``[cdiv(T, BLOCK_T), Hq, D]``, fp32) are then summed in torch, in a fixed order
(no atomics: the same chunk gives the same bits).

The layout is read at run time (``rotary_dim``, ``neox``: halves or interleaved pairs,
as ``expected.rotate``), so one compiled variant serves every model of a head size and
query dtype; token counts and strides are not specialised on (``jit.jit_unspecialized``)
and the warm-up (``kernels.warmup``) compiles it before the first request.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_adakv.kernels.jit import jit_unspecialized

BLOCK_T = 64  # tokens per program


@jit_unspecialized(ints=("num_tokens", "heads", "stride_t", "stride_h", "rotary_dim", "neox"),
                   pointers=("q_ptr", "pos_ptr", "cos_sin_ptr", "out_ptr"))
def _unrotated_partial_sums(q_ptr, pos_ptr, cos_sin_ptr, out_ptr, num_tokens, heads,
                            stride_t, stride_h, rotary_dim, neox, DIM: tl.constexpr,
                            HALF_P2: tl.constexpr, DIM_P2: tl.constexpr,
                            BLOCK: tl.constexpr):
    head = tl.program_id(0)
    tile = tl.program_id(1)
    t = tile * BLOCK + tl.arange(0, BLOCK)
    t_ok = t < num_tokens
    half = rotary_dim // 2
    i = tl.arange(0, HALF_P2)
    i_ok = i < half
    # Dims rotated by frequency i: (i, i + half) for neox halves, (2i, 2i + 1) for pairs.
    first = tl.where(neox != 0, i, 2 * i)
    second = tl.where(neox != 0, i + half, 2 * i + 1)
    pos = tl.load(pos_ptr + t, mask=t_ok, other=0)
    row = q_ptr + t[:, None] * stride_t + head * stride_h
    m = t_ok[:, None] & i_ok[None, :]
    a = tl.load(row + first[None, :], mask=m, other=0.0).to(tl.float32)
    b = tl.load(row + second[None, :], mask=m, other=0.0).to(tl.float32)
    table = cos_sin_ptr + pos[:, None] * rotary_dim
    cos = tl.load(table + i[None, :], mask=m, other=0.0)
    sin = tl.load(table + half + i[None, :], mask=m, other=0.0)
    # R^T: the rotation by -angle.
    out = out_ptr + (tile * heads + head) * DIM
    tl.store(out + first, tl.sum(a * cos + b * sin, axis=0), mask=i_ok)
    tl.store(out + second, tl.sum(b * cos - a * sin, axis=0), mask=i_ok)
    # Dims past rotary_dim pass through.
    d = tl.arange(0, DIM_P2)
    d_ok = (d >= rotary_dim) & (d < DIM)
    rest = tl.load(row + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
    tl.store(out + d, tl.sum(rest.to(tl.float32), axis=0), mask=d_ok)


def unrotated_sum_triton(query: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                         rotary_dim: int, neox: bool) -> torch.Tensor:
    """``expected.unrotated_sum``'s contract for fp16/bf16/fp32 queries: fp32 ``[Hq, D]``.
    ``query`` ``[T, Hq, D]`` may be a strided view with a unit last stride; ``cos_sin``
    fp32 ``[max_positions, rotary_dim]``, contiguous."""
    if query.dtype == torch.float64:
        raise ValueError("unrotated_sum_triton: float64 queries go to the torch reference")
    if query.stride(-1) != 1:
        raise ValueError("unrotated_sum_triton needs a unit stride along the head dim")
    if cos_sin.dtype != torch.float32 or not cos_sin.is_contiguous():
        raise ValueError("unrotated_sum_triton needs a contiguous fp32 cos_sin table")
    if rotary_dim % 2 or not 0 < rotary_dim <= query.shape[-1]:
        raise ValueError(f"rotary_dim {rotary_dim} must be even and in (0, head_dim]")
    num_tokens, heads, dim = query.shape
    tiles = max(1, triton.cdiv(num_tokens, BLOCK_T))
    partial = torch.empty(tiles, heads, dim, dtype=torch.float32, device=query.device)
    positions = positions.to(device=query.device, dtype=torch.int64)
    _unrotated_partial_sums[(heads, tiles)](
        query, positions, cos_sin, partial, num_tokens, heads, query.stride(0),
        query.stride(1), rotary_dim, int(neox), DIM=dim,
        HALF_P2=triton.next_power_of_2(max(dim // 2, 1)), DIM_P2=triton.next_power_of_2(dim),
        BLOCK=BLOCK_T)
    return partial.sum(0)
