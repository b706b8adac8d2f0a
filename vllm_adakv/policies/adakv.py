"""Ada-KV (arXiv 2407.11550): head-wise adaptive budget allocation inside one layer."""

from __future__ import annotations

import math

import torch

from vllm_adakv.tensors import on_device

from .common import candidate_mask, check_int, check_scores, sanitize, ties_to_lower


def _stable_order(*keys: torch.Tensor) -> torch.Tensor:
    """Head order sorted descending by ``keys[0]``, then ``keys[1]``, ...; ties: lower index."""
    order = torch.arange(keys[0].numel(), device=keys[0].device)
    for key in reversed(keys):
        order = order[torch.sort(key[order], descending=True, stable=True).indices]
    return order


def _spread(amount: torch.Tensor, room: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Spread ``amount`` units over heads in ``order``: one per head with room, then greedily.

    Never gives a head more than ``room[h]``. Loop-free, no host sync.
    """
    r = room[order]
    has_room = r > 0
    first = (has_room & (has_room.long().cumsum(0) <= amount)).long()
    rest = amount - first.sum()
    r = r - first
    more = (rest - (r.cumsum(0) - r)).clamp(min=0).minimum(r)
    out = torch.zeros_like(room)
    out[order] = first + more
    return out


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
    if hits.is_cuda:
        # One program per row instead of ~75 tiny launches on [H] vectors (same result).
        from vllm_adakv.kernels.triton_allocation import safeguard_caps_triton

        caps = safeguard_caps_triton(hits, s, alpha, num_candidates)
    else:
        caps = safeguard_caps_reference(hits, s, alpha, num_candidates)
    keep_uniform = on_device([not a for a in active], torch.bool, device)[:, None]
    return torch.where(keep_uniform, uniform, caps)


def safeguard_caps_reference(hits: torch.Tensor, selectable: list[int], alpha: float,
                             num_candidates: list[int]) -> torch.Tensor:
    """Ada-KV's safeguard: per-head caps ``[R, H]`` from each row's layer-wide top-T ``hits``.

    Row ``r``: ``s = selectable[r]`` with ``0 < s < C = num_candidates[r]``, ``T = H * s``.
    Quota ``q[h] = alpha * s + (1 - alpha) * hits[h]``, floored and clamped to
    ``[floor(alpha * s), C]``, then rounded by largest remainder (ties: more hits, then
    lower head) so that the caps sum to ``T``; units taken back go first from the heads
    with most room above the floor (ties: smaller remainder, then lower head). The work is
    on [H]-sized vectors on the device: no host sync.
    """
    return torch.stack([_safeguard_row(hits[r], selectable[r], alpha, num_candidates[r])
                        for r in range(hits.shape[0])])


def _safeguard_row(hits: torch.Tensor, selectable: int, alpha: float,
                   num_candidates: int) -> torch.Tensor:
    num_heads = hits.numel()
    total = num_heads * selectable
    quota = alpha * selectable + (1.0 - alpha) * hits.double()
    lower = math.floor(alpha * selectable)
    caps = quota.floor().long().clamp(lower, num_candidates)
    frac = quota - caps.double()
    diff = total - caps.sum()
    give = _spread(diff.clamp(min=0), num_candidates - caps, _stable_order(frac, hits))
    take = _spread((-diff).clamp(min=0), caps - lower, _stable_order(caps - lower, -frac))
    return caps + give - take
