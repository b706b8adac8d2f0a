"""SnapKV: every head keeps its own top-B' candidates (uniform budget)."""

from __future__ import annotations

import torch

from .common import check_int


def snapkv_counts(num_heads: int, num_candidates: int, selectable: int,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Candidates kept per head (window excluded): ``min(selectable, C)`` for every head."""
    num_heads = check_int("num_heads", num_heads, 1)
    num_candidates = check_int("num_candidates", num_candidates, 0)
    selectable = check_int("selectable", selectable, 0)
    return torch.full((num_heads,), min(selectable, num_candidates), dtype=torch.long,
                      device=device)
