"""Ada-KV's safeguard: per-head caps from a layer's top-T hits (torch references).

``triton_allocation.safeguard_caps_triton`` and ``safeguard_caps_heads_triton`` are the
same on CUDA, one program per row; ``safeguard_caps`` and ``safeguard_caps_heads`` pick
by device.
"""

from __future__ import annotations

import math

import torch


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


def check_heads_inputs(hits: torch.Tensor, totals: torch.Tensor, alpha: float,
                       num_candidates: torch.Tensor) -> float:
    """Refuse what ``safeguard_caps_heads_reference`` cannot take (``ValueError``): shapes
    other than ``hits [R, H]`` (``H >= 1``), ``totals [R]``, ``num_candidates [R, H]``,
    non-integer dtypes, tensors on different devices, ``alpha`` outside ``[0, 1]``.
    Returns ``alpha`` as a float. Reads no tensor value (no host sync)."""
    named = {"hits": hits, "totals": totals, "num_candidates": num_candidates}
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
            raise ValueError(f"{name} must hold integers, got {x.dtype}")
        if x.device != hits.device:
            raise ValueError(f"{name} is on {x.device}, hits on {hits.device}")
    if hits.dim() != 2 or hits.shape[1] == 0:
        raise ValueError(f"hits must be [R, H] with H >= 1, got {tuple(hits.shape)}")
    if tuple(totals.shape) != hits.shape[:1]:
        raise ValueError(f"totals must be [{hits.shape[0]}], got {tuple(totals.shape)}")
    if num_candidates.shape != hits.shape:
        raise ValueError(f"num_candidates must be {tuple(hits.shape)}, "
                         f"got {tuple(num_candidates.shape)}")
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha


def safeguard_caps_heads_reference(hits: torch.Tensor, totals: torch.Tensor, alpha: float,
                                   num_candidates: torch.Tensor) -> torch.Tensor:
    """Ada-KV's safeguard when each head has its own candidate count (decode events):
    caps ``[R, H]`` summing to ``totals[r]``.

    ``num_candidates`` ``[R, H]`` bounds each head; ``totals`` ``[R]`` must lie in
    ``[0, sum_h num_candidates[r, h]]``. With ``share = T / H``: quota
    ``q[h] = alpha * share + (1 - alpha) * hits[h]``, floored and clamped to
    ``[lower[h], n[h]]`` with ``lower[h] = min(floor(alpha * share), n[h])``, then the
    same largest-remainder rounding as ``safeguard_caps_reference``, which this equals
    when every head has ``C`` candidates and ``T = H * s`` with ``0 < s < C``. Integer
    tensors on one device (``check_heads_inputs``); values are not checked.
    """
    alpha = check_heads_inputs(hits, totals, alpha, num_candidates)
    if hits.shape[0] == 0:
        return torch.zeros(hits.shape, dtype=torch.long, device=hits.device)
    return torch.stack([
        _safeguard_heads(hits[r], totals[r], alpha, num_candidates[r].long())
        for r in range(hits.shape[0])])


def _safeguard_heads(hits: torch.Tensor, total: torch.Tensor, alpha: float,
                     upper: torch.Tensor) -> torch.Tensor:
    share = total.double() / hits.numel()
    quota = alpha * share + (1.0 - alpha) * hits.double()
    lower = torch.minimum(torch.floor(alpha * share).long(), upper)
    caps = torch.maximum(torch.minimum(quota.floor().long(), upper), lower)
    frac = quota - caps.double()
    diff = total - caps.sum()
    give = _spread(diff.clamp(min=0), upper - caps, _stable_order(frac, hits))
    take = _spread((-diff).clamp(min=0), caps - lower, _stable_order(caps - lower, -frac))
    return caps + give - take


def safeguard_caps(hits: torch.Tensor, selectable: list[int], alpha: float,
                   num_candidates: list[int]) -> torch.Tensor:
    """``safeguard_caps_reference``'s contract; Triton on CUDA (one program per row instead
    of ~75 tiny launches on [H] vectors, same result)."""
    if hits.is_cuda:
        from vllm_adakv.kernels.triton_allocation import safeguard_caps_triton

        return safeguard_caps_triton(hits, selectable, alpha, num_candidates)
    return safeguard_caps_reference(hits, selectable, alpha, num_candidates)


def safeguard_caps_heads(hits: torch.Tensor, totals: torch.Tensor, alpha: float,
                         num_candidates: torch.Tensor) -> torch.Tensor:
    """``safeguard_caps_heads_reference``'s contract; Triton on CUDA (one program per row,
    no host sync)."""
    if hits.is_cuda:
        from vllm_adakv.kernels.triton_allocation import safeguard_caps_heads_triton

        return safeguard_caps_heads_triton(hits, totals, alpha, num_candidates)
    return safeguard_caps_heads_reference(hits, totals, alpha, num_candidates)
