"""Shared helpers for the compression policies (pure torch, no vLLM imports)."""

from __future__ import annotations

import numbers

import torch

from vllm_adakv.tensors import on_device


def check_int(name: str, value: object, minimum: int = 0) -> int:
    """Return ``value`` as an int, raising ValueError unless it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_scores(scores: object, num_heads: int | None = None,
                 num_candidates: int | None = None) -> torch.Tensor:
    """Validate a ``[H, C]`` floating-point score tensor; optionally check its shape."""
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(
            f"scores must be 2-D [num_heads, num_candidates], got {tuple(scores.shape)}"
        )
    if not scores.is_floating_point():
        raise ValueError(f"scores must be floating point, got {scores.dtype}")
    expected = (
        scores.shape[0] if num_heads is None else num_heads,
        scores.shape[1] if num_candidates is None else num_candidates,
    )
    if tuple(scores.shape) != expected:
        raise ValueError(
            f"scores shape {tuple(scores.shape)} does not match expected "
            f"[num_heads, prompt_len - window] = {list(expected)}"
        )
    return scores


def sanitize(scores: torch.Tensor) -> torch.Tensor:
    """Map NaN scores to -inf so they are never preferred (no host sync)."""
    return torch.where(torch.isnan(scores), float("-inf"), scores)


def ties_to_lower(x: torch.Tensor, thr: torch.Tensor, need: torch.Tensor,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """Keep entries ``> thr`` plus the first ``need`` entries ``== thr`` along the last dim.

    ``thr`` / ``need`` broadcast against ``x`` with a trailing dim of 1. This is what a stable
    descending sort would keep, at the cost of a selection instead of a sort. ``valid``
    (broadcasting against ``x``) excludes padding from the ties: padded entries must hold
    -inf, so that they are never ``> thr`` either.
    """
    equal = x == thr
    if valid is not None:
        equal = equal & valid
    return (x > thr) | (equal & (equal.cumsum(-1) <= need))


def candidate_mask(num_candidates: list[int], width: int, device) -> torch.Tensor:
    """Bool ``[R, 1, width]``: position ``c`` of row ``r`` is a real candidate (``c < C_r``)."""
    lengths = on_device(num_candidates, torch.long, device)
    return (torch.arange(width, device=device) < lengths[:, None]).unsqueeze(1)


def topk_masks(scores: torch.Tensor, counts: torch.Tensor, num_candidates: list[int],
               max_count: int) -> torch.Tensor:
    """``topk_mask`` for ``R`` rows at once: bool ``[R, H, Cmax]``.

    Row ``r`` holds ``C_r = num_candidates[r]`` real candidates followed by padding (any
    value: it is never kept); ``counts`` is ``[R, H]`` and ``max_count`` a host bound on it.
    Each row equals ``topk_mask(scores[r, :, :C_r], counts[r])`` padded with False.
    """
    rows, num_heads, width = scores.shape
    valid = candidate_mask(num_candidates, width, scores.device)
    limit = on_device(num_candidates, torch.long, scores.device)[:, None]
    counts = torch.minimum(counts.long().clamp(min=0), limit)
    kmax = min(check_int("max_count", max_count, 0), width)
    if kmax == 0:
        return torch.zeros(rows, num_heads, width, dtype=torch.bool, device=scores.device)
    x = torch.where(valid, sanitize(scores), float("-inf"))
    if 2 * kmax > width:
        # Most of each row: one sort is cheaper than a top-k this large (on CUDA).
        top = torch.sort(x, dim=-1, descending=True).values
    else:
        top = torch.topk(x, kmax, dim=-1, sorted=True).values
    thr = top.gather(-1, (counts - 1).clamp(min=0).unsqueeze(-1))
    need = counts.unsqueeze(-1) - (x > thr).sum(-1, keepdim=True)
    return ties_to_lower(x, thr, need, valid)


def topk_mask(scores: torch.Tensor, counts: torch.Tensor, max_count: int | None = None
              ) -> torch.Tensor:
    """Bool mask ``[H, C]``: head ``h`` keeps its top ``counts[h]`` candidates.

    Vectorised over heads (one ``topk`` for the threshold, exact tie handling); ties prefer
    the lower position index, so the result is deterministic. Counts are clamped to
    ``[0, C]``. NaN scores rank below everything. ``max_count``, an upper bound on
    ``counts`` known on the host, saves reading ``counts.max()`` back from the device.
    """
    check_scores(scores)
    num_heads, num_candidates = scores.shape
    counts = torch.as_tensor(counts, device=scores.device).long().reshape(-1)
    if counts.numel() != num_heads:
        raise ValueError(f"counts has {counts.numel()} entries, expected {num_heads}")
    counts = counts.clamp(0, num_candidates)
    if max_count is not None:
        kmax = min(check_int("max_count", max_count, 0), num_candidates)
    else:
        kmax = int(counts.max()) if num_heads else 0
    return topk_masks(scores[None], counts[None], [num_candidates], kmax)[0]


def head_topk_masks(scores: torch.Tensor, counts: torch.Tensor, num_candidates: torch.Tensor,
                    max_count: int) -> torch.Tensor:
    """Bool ``[R, H, Cmax]``: head ``(r, h)`` keeps its top ``counts[r, h]`` among its first
    ``num_candidates[r, h]`` entries (ties: lower index); ``counts`` must not exceed them.

    Padding is set to -inf, which ranks after every real entry in ``topk_masks`` (real
    ties at -inf come first in the row), so it is never kept."""
    rows, heads, width = scores.shape
    valid = torch.arange(width, device=scores.device) < num_candidates.to(
        scores.device).long()[..., None]
    x = torch.where(valid, sanitize(scores), float("-inf"))
    return topk_masks(x, counts, [width] * rows, max_count) & valid
