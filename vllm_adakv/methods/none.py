"""``none``: no compression; the request runs exactly as in vanilla vLLM."""

from __future__ import annotations

from typing import Any

import torch

from .base import Method, window_mask
from .snapkv import check_rows


class NoCompression(Method):
    """Keeps every prompt token (plans nothing: the scheduler and workers leave it alone)."""

    name = "none"
    compresses = False

    def select(self, scores: torch.Tensor | None, *, num_heads: int, prompt_lens: list[int],
               budgets: list[int], cfg: Any, device: Any = None) -> torch.Tensor:
        """Every prompt position of every head: ``[R, H, Lmax]``."""
        check_rows(num_heads, prompt_lens, budgets, cfg.window, compresses=False)
        width = max(prompt_lens)
        in_prompt, _ = window_mask(prompt_lens, cfg.window, num_heads, width, device)
        return in_prompt.expand(len(prompt_lens), num_heads, width).clone()
