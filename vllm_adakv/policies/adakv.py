"""Ada-KV (arXiv 2407.11550): head-wise adaptive budget allocation inside one layer."""

from __future__ import annotations

import math

import torch

from .common import check_int, check_scores, sanitize, ties_to_lower


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
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    num_heads, num_candidates = scores.shape
    s = min(selectable, num_candidates)
    total = num_heads * s
    device = scores.device
    if s == 0 or s == num_candidates:
        return torch.full((num_heads,), s, dtype=torch.long, device=device)

    # Layer-wide top-T; ties go to the lower flat index (lower head, then lower position).
    flat = sanitize(scores).reshape(-1)
    # The total-th largest score (a sort: far faster than kthvalue on CUDA).
    thr = torch.sort(flat, descending=True).values[total - 1]
    need = total - (flat > thr).sum()
    hits = ties_to_lower(flat, thr, need).view(num_heads, num_candidates).sum(1)
    if hits.is_cuda:
        # One program instead of ~75 tiny launches on [H] vectors (same result).
        from vllm_adakv.kernels.triton_allocation import safeguard_caps_triton

        return safeguard_caps_triton(hits, s, alpha, num_candidates)
    return safeguard_caps_reference(hits, s, alpha, num_candidates)


def safeguard_caps_reference(hits: torch.Tensor, selectable: int, alpha: float,
                             num_candidates: int) -> torch.Tensor:
    """Ada-KV's safeguard: per-head caps from the layer-wide top-T ``hits``.

    ``selectable`` is ``s = min(budget - window, C)`` with ``0 < s < C``, ``T = H * s``.
    Quota ``q[h] = alpha * s + (1 - alpha) * hits[h]``, floored and clamped to
    ``[floor(alpha * s), C]``, then rounded by largest remainder (ties: more hits, then
    lower head) so that the caps sum to ``T``; units taken back go first from the heads
    with most room above the floor (ties: smaller remainder, then lower head). The rest
    works on [H]-sized vectors on the device: no host sync.
    """
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
