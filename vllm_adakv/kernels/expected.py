"""The expected scorer's query model: the mean prompt query, rotated to future positions.

Torch, no vLLM imports. Rotary tables follow vLLM's ``RotaryEmbedding``: row ``p`` of
``cos_sin`` is ``[cos(p * f_i)..., sin(p * f_i)...]`` over the ``rotary_dim / 2``
frequencies (scaled ones included: the table is the model's), applied to the first
``rotary_dim`` dims of a head, as halves (``neox``) or interleaved pairs (GPT-J).

A prompt query ``q_p`` at position ``p`` is ``R_p q~_p`` with ``q~_p`` the query before
RoPE. :func:`unrotated_sum_reference` (Triton: ``triton_expected``) adds ``R_p^T q_p``
over a chunk's tokens, so the mean over the prompt ``mu~`` needs no weights and no
change to the model. :func:`future_query` returns ``mean_t R_t mu~`` over the ``future``
positions after the prompt: the rotation is linear in ``(cos, sin)``, so that is ``mu~``
rotated by the averaged table rows. It is the expected query of the positions to come,
read by the window scorer's kernels as a one-query window (``methods.scorers``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeTable:
    """A layer's rotary embedding: ``cos_sin`` ``[max_positions, rotary_dim]`` (fp32, on
    the queries' device), applied to the first ``rotary_dim`` dims as halves (``neox``) or
    interleaved pairs."""

    cos_sin: torch.Tensor
    rotary_dim: int
    neox: bool


def _halves(x: torch.Tensor, rotary_dim: int, neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rot = x[..., :rotary_dim]
    if neox:
        return rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2:]
    return rot[..., 0::2], rot[..., 1::2]


def _join(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rotary_dim: int,
          neox: bool) -> torch.Tensor:
    rot = torch.cat((a, b), -1) if neox else torch.stack((a, b), -1).flatten(-2)
    return torch.cat((rot, x[..., rotary_dim:]), -1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
           neox: bool, inverse: bool = False) -> torch.Tensor:
    """``R x`` (``R^T x`` with ``inverse``) for ``x`` ``[..., T, H, D]`` and ``cos``/``sin``
    ``[T, rotary_dim / 2]``, in ``x``'s dtype."""
    a, b = _halves(x, rotary_dim, neox)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    if inverse:
        sin = -sin
    return _join(x, a * cos - b * sin, b * cos + a * sin, rotary_dim, neox)


def _table(cos_sin: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
           ) -> tuple[torch.Tensor, torch.Tensor]:
    rows = cos_sin.index_select(0, positions.to(cos_sin.device).long()).to(dtype)
    return rows.chunk(2, dim=-1)


def unrotated_sum_reference(query: torch.Tensor, positions: torch.Tensor,
                            cos_sin: torch.Tensor, rotary_dim: int, neox: bool) -> torch.Tensor:
    """``sum_p R_p^T q_p``: fp32 ``[Hq, D]`` over a chunk's queries ``[T, Hq, D]`` (after
    RoPE) at ``positions`` ``[T]`` (float64 for float64 queries)."""
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    cos, sin = _table(cos_sin, positions, work)
    return rotate(query.to(work), cos, sin, rotary_dim, neox, inverse=True).sum(0)


def future_query(mean: torch.Tensor, prompt_len: int, future: int, cos_sin: torch.Tensor,
                 rotary_dim: int, neox: bool) -> torch.Tensor:
    """``mean_t R_t mean`` over ``t`` in ``[prompt_len, prompt_len + future)``, clipped to
    the table's positions: ``[Hq, D]`` in ``mean``'s dtype (fp32 or float64)."""
    if future < 1:
        raise ValueError(f"future must be >= 1, got {future}")
    stop = min(prompt_len + future, cos_sin.shape[0])
    start = min(prompt_len, stop - 1)
    cos, sin = _table(cos_sin, torch.arange(start, stop, device=cos_sin.device), mean.dtype)
    cos, sin = cos.mean(0, keepdim=True), sin.mean(0, keepdim=True)
    return rotate(mean[None], cos.to(mean.device), sin.to(mean.device), rotary_dim, neox)[0]
