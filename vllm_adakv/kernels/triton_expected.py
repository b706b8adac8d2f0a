"""The expected scorer's per-chunk work in Triton: ``expected.unrotated_moments`` fused.

``sum_p q~_p`` and ``sum_p q~_p q~_p^T`` with ``q~_p = R_p^T q_p`` over a prefill chunk's
queries ``[T, Hq, D]`` (after RoPE). The torch reference materialises the un-rotated chunk
in fp32 (``T x Hq x D``, 134 MB for 8k tokens of 32 heads of 128); here the queries are
rotated back in registers and never written.

A head's dims fall into *pieces* of ``CH`` dims: the first and the second dim of each
rotated pair (pieces 0 and 1: ``(i, i + half)`` for neox halves, ``(2i, 2i + 1)`` for
GPT-J pairs), then the dims past ``rotary_dim`` in runs of ``CH`` (pieces 2, 3).
A program owns one query head, ``SPAN_T`` tokens and one pair of pieces ``(a, b)``: it
walks its tokens ``BLOCK_T`` at a time, rotates both pieces back and accumulates the
``[CH, CH]`` block ``sum_t x_a(t) x_b(t)^T`` of the second moment with one ``tl.dot``; the
diagonal pairs also add the first moment of their piece. Partials
(``[cdiv(T, SPAN_T), Hq, D(, D)]``, fp32) are summed in torch in a fixed order (no atomics:
the same chunk gives the same bits).

The layout is read at run time (``rotary_dim``, ``neox``, as ``expected.rotate``), so one
compiled variant serves every model of a head size and query dtype; token counts and
strides are not specialised on (``jit.jit_unspecialized``) and the warm-up
(``kernels.warmup``) compiles it before the first request.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_adakv.kernels.jit import jit_unspecialized

BLOCK_T = 64  # tokens per step of a program's loop
SPAN_T = 1024  # tokens per program


@triton.jit
def _piece_dims(piece, rotary_dim, neox, DIM: tl.constexpr, CH: tl.constexpr):
    """The head dims of ``piece`` ``[CH]`` and which of them exist."""
    c = tl.arange(0, CH)
    half = rotary_dim // 2
    which = c * 0 + piece
    first = tl.where(neox != 0, c, 2 * c)
    second = tl.where(neox != 0, c + half, 2 * c + 1)
    rest = rotary_dim + (piece - 2) * CH + c
    dims = tl.where(which == 0, first, tl.where(which == 1, second, rest))
    ok = tl.where(which < 2, c < half, rest < DIM)
    return dims, ok


@triton.jit
def _piece_values(row, t_ok, cos, sin, piece, rotary_dim, neox, DIM: tl.constexpr,
                  CH: tl.constexpr):
    """The un-rotated values ``[BLOCK, CH]`` (fp32) of ``piece`` for the tokens whose
    query rows start at ``row`` ``[BLOCK, 1]``; zero where a dim or a token is missing."""
    c = tl.arange(0, CH)
    half = rotary_dim // 2
    which = c * 0 + piece  # the piece as a [CH] tensor: masks stay tensors of booleans
    pair = t_ok[:, None] & ((c < half) & (which < 2))[None, :]
    a = tl.load(row + tl.where(neox != 0, c, 2 * c)[None, :], mask=pair, other=0.0)
    b = tl.load(row + tl.where(neox != 0, c + half, 2 * c + 1)[None, :], mask=pair,
                other=0.0)
    a = a.to(tl.float32)
    b = b.to(tl.float32)
    rest = rotary_dim + (piece - 2) * CH + c
    alone = (rest < DIM) & (which >= 2)
    plain = tl.load(row + rest[None, :], mask=t_ok[:, None] & alone[None, :],
                    other=0.0).to(tl.float32)
    # R^T: the rotation by -angle.
    return tl.where((which == 0)[None, :], a * cos + b * sin,
                    tl.where((which == 1)[None, :], b * cos - a * sin, plain))


@jit_unspecialized(ints=("num_tokens", "heads", "stride_t", "stride_h", "rotary_dim", "neox",
                         "num_pieces"),
                   pointers=("q_ptr", "pos_ptr", "cos_sin_ptr", "sum_ptr", "sq_ptr"))
def _unrotated_partial_moments(q_ptr, pos_ptr, cos_sin_ptr, sum_ptr, sq_ptr, num_tokens,
                               heads, stride_t, stride_h, rotary_dim, neox, num_pieces,
                               DIM: tl.constexpr, CH: tl.constexpr, BLOCK: tl.constexpr,
                               SPAN: tl.constexpr, PRECISION: tl.constexpr):
    head = tl.program_id(0)
    span = tl.program_id(1)
    pair = tl.program_id(2)
    pa = pair // num_pieces
    pb = pair % num_pieces
    c = tl.arange(0, CH)
    half = rotary_dim // 2
    acc = tl.zeros((CH, CH), dtype=tl.float32)
    total = tl.zeros((CH,), dtype=tl.float32)
    stop = tl.minimum(span * SPAN + SPAN, num_tokens)
    for t0 in range(span * SPAN, stop, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        t_ok = t < stop
        pos = tl.load(pos_ptr + t, mask=t_ok, other=0)
        row = q_ptr + t[:, None] * stride_t + head * stride_h
        m = t_ok[:, None] & (c < half)[None, :]
        table = cos_sin_ptr + pos[:, None] * rotary_dim
        cos = tl.load(table + c[None, :], mask=m, other=0.0)
        sin = tl.load(table + half + c[None, :], mask=m, other=0.0)
        xa = _piece_values(row, t_ok, cos, sin, pa, rotary_dim, neox, DIM, CH)
        xb = _piece_values(row, t_ok, cos, sin, pb, rotary_dim, neox, DIM, CH)
        acc += tl.dot(tl.trans(xa), xb, input_precision=PRECISION)
        total += tl.sum(xa, axis=0)
    da, ok_a = _piece_dims(pa, rotary_dim, neox, DIM, CH)
    db, ok_b = _piece_dims(pb, rotary_dim, neox, DIM, CH)
    base = span * heads + head
    tl.store(sq_ptr + base * DIM * DIM + da[:, None] * DIM + db[None, :], acc,
             mask=ok_a[:, None] & ok_b[None, :])
    tl.store(sum_ptr + base * DIM + da, total, mask=ok_a & ((c * 0 + pa) == pb))


def unrotated_moments_triton(query: torch.Tensor, positions: torch.Tensor,
                             cos_sin: torch.Tensor, rotary_dim: int, neox: bool,
                             precision: str = "tf32x3", span: int = SPAN_T
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``expected.unrotated_moments_reference``'s contract for fp16/bf16/fp32 queries: fp32
    ``[Hq, D]`` and ``[Hq, D, D]``. ``query`` ``[T, Hq, D]`` may be a strided view with a
    unit last stride; ``cos_sin`` fp32 ``[max_positions, rotary_dim]``, contiguous;
    ``precision``: Triton's ``input_precision`` of the second moment's fp32 dots; ``span``:
    tokens per program (a multiple of ``BLOCK_T``)."""
    if query.dtype == torch.float64:
        raise ValueError("unrotated_moments_triton: float64 queries go to the torch reference")
    if query.stride(-1) != 1:
        raise ValueError("unrotated_moments_triton needs a unit stride along the head dim")
    if cos_sin.dtype != torch.float32 or not cos_sin.is_contiguous():
        raise ValueError("unrotated_moments_triton needs a contiguous fp32 cos_sin table")
    if rotary_dim % 2 or not 0 < rotary_dim <= query.shape[-1]:
        raise ValueError(f"rotary_dim {rotary_dim} must be even and in (0, head_dim]")
    num_tokens, heads, dim = query.shape
    chunk = max(16, triton.next_power_of_2(dim) // 2)
    pieces = 2 + triton.cdiv(dim - rotary_dim, chunk)
    if span % BLOCK_T:
        raise ValueError(f"span {span} must be a multiple of {BLOCK_T}")
    spans = max(1, triton.cdiv(num_tokens, span))
    total = torch.zeros(spans, heads, dim, dtype=torch.float32, device=query.device)
    second = torch.zeros(spans, heads, dim, dim, dtype=torch.float32, device=query.device)
    positions = positions.to(device=query.device, dtype=torch.int64)
    _unrotated_partial_moments[(heads, spans, pieces * pieces)](
        query, positions, cos_sin, total, second, num_tokens, heads, query.stride(0),
        query.stride(1), rotary_dim, int(neox), pieces, DIM=dim, CH=chunk, BLOCK=BLOCK_T,
        SPAN=span, PRECISION=precision)
    return total.sum(0), second.sum(0)
