"""StreamingLLM: keep the first ``sink_tokens`` tokens and the most recent ones."""

from __future__ import annotations

import torch

from .common import check_int


def streamingllm_mask(num_heads: int, num_candidates: int, selectable: int, sink_tokens: int,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Bool mask ``[H, C]`` over candidates: the first ``sink_tokens`` and the last
    ``selectable - sink_tokens`` candidates (all candidates if ``selectable >= C``).
    """
    num_heads = check_int("num_heads", num_heads, 1)
    num_candidates = check_int("num_candidates", num_candidates, 0)
    selectable = check_int("selectable", selectable, 0)
    sink_tokens = check_int("sink_tokens", sink_tokens, 0)
    if sink_tokens > selectable:
        raise ValueError(
            f"streamingllm needs budget - window >= sink_tokens, got selectable={selectable} "
            f"< sink_tokens={sink_tokens}"
        )
    pos = torch.arange(num_candidates, device=device)
    if selectable >= num_candidates:
        keep = torch.ones_like(pos, dtype=torch.bool)
    else:
        keep = (pos < sink_tokens) | (pos >= num_candidates - (selectable - sink_tokens))
    return keep.unsqueeze(0).expand(num_heads, -1).clone()
