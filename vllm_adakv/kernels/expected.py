"""The expected scorer's query model: a Gaussian fitted to the prompt's queries before
RoPE, rotated to future positions, and the attention it is expected to pay.

Torch, no vLLM imports. Rotary tables follow vLLM's ``RotaryEmbedding``: row ``p`` of
``cos_sin`` is ``[cos(p * f_i)..., sin(p * f_i)...]`` over the ``rotary_dim / 2``
frequencies (scaled ones included: the table is the model's), applied to the first
``rotary_dim`` dims of a head, as halves (``neox``) or interleaved pairs (GPT-J).

A prompt query ``q_p`` at position ``p`` is ``R_p q~_p`` with ``q~_p`` the query before
RoPE. :func:`unrotated_moments_reference` (Triton: ``triton_expected``) adds ``q~_p`` and
``q~_p q~_p^T`` over a chunk's tokens, so the mean ``mu~`` and covariance ``S~`` of the
prompt's queries need no change to the model. :func:`future_moments` moves them to the
``future`` positions after the prompt with the averaged rotation ``A = mean_t R_t`` (the
rotation is linear in ``(cos, sin)``, so ``A`` is the rotation by the averaged table rows):
``mu = A mu~`` and ``S = A S~ A^T``. :func:`score_expected` scores each prompt key
``k`` by ``E[exp(q.k s)]`` for ``q ~ N(mu, S)`` and logit scale ``s``, i.e. the logit
``s mu.k + s^2 k^T S k / 2``, normalised over the prompt's keys (arXiv 2510.00636).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_adakv.kernels.fp8 import dequantize
from vllm_adakv.kernels.scoring import gather_prompt_keys


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


def unrotated_moments_reference(query: torch.Tensor, positions: torch.Tensor,
                                cos_sin: torch.Tensor, rotary_dim: int, neox: bool
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_p q~_p, sum_p q~_p q~_p^T)`` with ``q~_p = R_p^T q_p``: fp32 ``[Hq, D]`` and
    ``[Hq, D, D]`` over a chunk's queries ``[T, Hq, D]`` (after RoPE) at ``positions``
    ``[T]`` (float64 for float64 queries)."""
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    cos, sin = _table(cos_sin, positions, work)
    back = rotate(query.to(work), cos, sin, rotary_dim, neox, inverse=True)
    return back.sum(0), torch.einsum("thd,the->hde", back, back)


def _averaged_rows(prompt_len: int, future: int, cos_sin: torch.Tensor, dtype: torch.dtype,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The table rows averaged over ``[prompt_len, prompt_len + future)``, clipped to the
    table's positions: ``cos``, ``sin`` ``[1, rotary_dim / 2]``."""
    if future < 1:
        raise ValueError(f"future must be >= 1, got {future}")
    stop = min(prompt_len + future, cos_sin.shape[0])
    start = min(prompt_len, stop - 1)
    cos, sin = _table(cos_sin, torch.arange(start, stop, device=cos_sin.device), dtype)
    return cos.mean(0, keepdim=True).to(device), sin.mean(0, keepdim=True).to(device)


def future_moments(total: torch.Tensor, second: torch.Tensor, count: int, prompt_len: int,
                   future: int, cos_sin: torch.Tensor, rotary_dim: int, neox: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The query Gaussian at the ``future`` positions after the prompt, from the sums of
    :func:`unrotated_moments_reference` over ``count`` tokens: ``(A mu~, A S~ A^T)``,
    ``[Hq, D]`` and ``[Hq, D, D]`` in ``total``'s dtype (``S~``: the population
    covariance)."""
    mean = total / count
    cov = second / count - mean[..., :, None] * mean[..., None, :]
    cos, sin = _averaged_rows(prompt_len, future, cos_sin, mean.dtype, mean.device)
    mu = rotate(mean[None], cos, sin, rotary_dim, neox)[0]
    # rotate() maps each row x to A x: rows of S~ give S~ A^T, rows of its transpose A S~ A^T.
    half = rotate(cov, cos, sin, rotary_dim, neox)
    return mu, rotate(half.transpose(-1, -2), cos, sin, rotary_dim, neox)


def score_expected(
    mean: torch.Tensor,
    cov: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    block_rows: list[int],
    prompt_lens: list[int],
    scale: float,
    *,
    gqa_reduce: str,
    k_scale: torch.Tensor | None = None,
    chunk: int = 2048,
) -> torch.Tensor:
    """Expected attention of each row's query Gaussian (``mean`` ``[R, Hq, D]``, ``cov``
    ``[R, Hq, D, D]``, after :func:`future_moments`) on its prompt keys: fp32
    ``[R, H, Lmax]``, -inf padding. Per query head, the logit ``s mu.k + s^2 k^T S k / 2``
    is normalised over the row's ``L`` keys (``block_table[block_rows[r]]``, an fp8 cache
    read with ``k_scale``), then reduced over each GQA group (mean or max). Computed in
    fp32 (float64 for a float64 ``mean``), ``chunk`` keys at a time for the quadratic term.
    """
    rows, num_q_heads, dim = mean.shape
    heads = key_cache.shape[1]
    group = num_q_heads // heads
    work = torch.float64 if mean.dtype == torch.float64 else torch.float32
    out = torch.full((rows, heads, max(prompt_lens)), float("-inf"), dtype=torch.float32,
                     device=mean.device)
    for r, (block_row, length) in enumerate(zip(block_rows, prompt_lens, strict=True)):
        keys = dequantize(gather_prompt_keys(key_cache, block_table[block_row], length),
                          k_scale, work).to(mean.device)  # [H, L, D]
        mu = mean[r].to(work).view(heads, group, dim)
        sigma = cov[r].to(work).view(heads, group, dim, dim)
        logits = torch.einsum("hgd,hld->hgl", mu, keys) * scale
        for lo in range(0, length, chunk):
            part = keys[:, lo : lo + chunk]
            spread = torch.einsum("hld,hgde->hgle", part, sigma)
            logits[..., lo : lo + chunk] += (spread * part[:, None]).sum(-1) * (scale**2 / 2)
        attn = torch.softmax(logits, dim=-1)  # [H, G, L]
        if gqa_reduce == "mean":
            reduced = attn.mean(dim=1)
        elif gqa_reduce == "max":
            reduced = attn.amax(dim=1)
        else:
            raise ValueError(f"unknown gqa_reduce {gqa_reduce!r}")
        out[r, :, :length] = reduced.float()
    return out
