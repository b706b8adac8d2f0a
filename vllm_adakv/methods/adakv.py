"""Ada-KV (arXiv 2407.11550): head-wise adaptive budget allocation inside one layer."""

from __future__ import annotations

from typing import Any

import torch

from vllm_adakv.kernels.allocation import safeguard_caps, safeguard_caps_heads
from vllm_adakv.tensors import host_to_device, on_device

from .common import candidate_mask, check_int, check_scores, sanitize, ties_to_lower
from .snapkv import SnapKV


def adakv_counts(scores: torch.Tensor, selectable: int, alpha: float) -> torch.Tensor:
    """Candidates kept per head (window excluded) under Ada-KV's allocation.

    ``T = H * min(selectable, C)`` slots go to the layer-wide top-T scores (``hits[h]`` per
    head); the safeguard mixes them with a uniform share, quota
    ``q[h] = alpha * s + (1 - alpha) * hits[h]`` (``s = min(selectable, C)``), rounded by
    largest remainder (ties: more hits, then lower head) so that ``sum == T`` exactly,
    ``floor(alpha * s) <= cap[h] <= C``. ``alpha = 0`` gives exactly ``hits``.
    """
    check_scores(scores)
    selectable = check_int("selectable", selectable, 0)
    return adakv_counts_rows(scores[None], [scores.shape[1]], [selectable], alpha)[0]


def adakv_counts_rows(scores: torch.Tensor, num_candidates: list[int],
                      selectable: list[int], alpha: float) -> torch.Tensor:
    """``adakv_counts`` for ``R`` rows at once: LongTensor ``[R, H]``.

    ``scores`` is ``[R, H, Cmax]``; row ``r`` has ``num_candidates[r]`` real candidates
    (the rest is padding, never counted) and its own ``selectable[r]``. Each row equals
    ``adakv_counts(scores[r, :, :C_r], selectable[r], alpha)``.
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rows, num_heads, width = scores.shape
    device = scores.device
    s = [min(sel, c) for sel, c in zip(selectable, num_candidates, strict=True)]
    uniform = on_device(s, torch.long, device)[:, None].expand(rows, num_heads)
    active = [0 < si < c for si, c in zip(s, num_candidates, strict=True)]
    if not any(active):
        return uniform.clone()
    # Layer-wide top-T of each row; ties go to the lower flat index (lower head, then
    # lower position); padding is -inf and never taken.
    valid = candidate_mask(num_candidates, width, device).expand(rows, num_heads, width)
    flat = torch.where(valid, sanitize(scores), float("-inf")).reshape(rows, -1)
    valid = valid.reshape(rows, -1)
    total = on_device([num_heads * si for si in s], torch.long, device)[:, None]
    # The T-th largest score of each row (a sort: far faster than kthvalue on CUDA).
    ordered = torch.sort(flat, dim=1, descending=True).values
    thr = ordered.gather(1, (total - 1).clamp(min=0))
    need = total - (flat > thr).sum(1, keepdim=True)
    hits = ties_to_lower(flat, thr, need, valid).view(rows, num_heads, width).sum(-1)
    caps = safeguard_caps(hits, s, alpha, num_candidates)
    keep_uniform = on_device([not a for a in active], torch.bool, device)[:, None]
    return torch.where(keep_uniform, uniform, caps)


def adakv_counts_heads(scores: torch.Tensor, num_candidates: torch.Tensor,
                       selectable: list[int], alpha: float) -> torch.Tensor:
    """Ada-KV's allocation when each head has its own candidates (decode events):
    LongTensor ``[R, H]``.

    ``scores`` ``[R, H, Cmax]``; head ``(r, h)`` has ``n = num_candidates[r, h]`` real
    candidates. Row ``r`` keeps ``T = min(H * selectable[r], sum_h n)``: all when that is
    every candidate, else the layer-wide top-T (ties: lower head, then lower index) gives
    ``hits``, mixed with the uniform share ``T / H`` by the safeguard
    (``safeguard_caps_heads_reference``): ``min(floor(alpha * T / H), n) <= cap <= n``.
    With ``C`` candidates in every head it equals ``adakv_counts_rows``. No host sync on
    CUDA (the safeguard is one Triton program per row there; counts on the host go up
    through pinned memory).
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rows, num_heads, width = scores.shape
    device = scores.device
    if num_candidates.device != device:
        num_candidates = host_to_device(num_candidates, device)
    counts = num_candidates.long()
    available = counts.sum(1)
    total = torch.minimum(on_device(selectable, torch.long, device) * num_heads, available)
    if width == 0:
        return counts.clone()
    valid = torch.arange(width, device=device) < counts[..., None]
    flat = torch.where(valid, sanitize(scores), float("-inf")).reshape(rows, -1)
    valid = valid.reshape(rows, -1)
    ordered = torch.sort(flat, dim=1, descending=True).values
    thr = ordered.gather(1, (total[:, None] - 1).clamp(min=0))
    need = total[:, None] - (flat > thr).sum(1, keepdim=True)
    hits = ties_to_lower(flat, thr, need, valid).view(rows, num_heads, width).sum(-1)
    caps = safeguard_caps_heads(hits, total, alpha, counts)
    caps = torch.where((total == available)[:, None], counts, caps)
    return torch.where((total == 0)[:, None], torch.zeros_like(caps), caps)


class AdaKV(SnapKV):
    """Ada-KV over a scorer: the layer's total ``H * B'`` goes to the layer-wide top
    scores, mixed with a uniform share by the safeguard ``alpha`` (``adakv_counts``).

    ``scorer`` computes the scores (default: SnapKV's window scores), as kvpress's
    ``AdaKVPress`` wraps a scorer press."""

    name = "adakv"
    uniform = False
    kernels = frozenset({"scoring", "allocation"})

    def __init__(self, scorer: SnapKV | None = None) -> None:
        self.scorer = scorer if scorer is not None else SnapKV()

    def scores(self, batch) -> torch.Tensor:
        return self.scorer.scores(batch)

    def counts(self, scores: torch.Tensor, num_candidates: list[int], selectable: list[int],
               cfg: Any) -> tuple[torch.Tensor, int]:
        return adakv_counts_rows(scores, num_candidates, selectable, cfg.alpha), \
            max(num_candidates)

    def __repr__(self) -> str:
        return f"AdaKV({self.scorer!r})"

    def decode_counts(self, scores: torch.Tensor, num_candidates: torch.Tensor,
                      selectable: list[int], cfg: Any) -> tuple[torch.Tensor, int]:
        return adakv_counts_heads(scores, num_candidates, selectable, cfg.alpha), \
            scores.shape[2]
