"""StreamingLLM: keep the first ``sink_tokens`` tokens and the most recent ones."""

from __future__ import annotations

from typing import Any

import torch

from vllm_adakv.tensors import on_device

from .base import DecodeRows, LayerRows, Method, check_decode_rows, with_window
from .common import check_int
from .snapkv import check_rows


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


class StreamingLLM(Method):
    """Sinks + most recent tokens, the same for every head; no scores."""

    name = "streamingllm"
    decode_scored = False

    def validate(self, cfg: Any) -> None:
        if cfg.sink_tokens > cfg.budget - cfg.window:
            raise ValueError(
                f"--kv-sink-tokens ({cfg.sink_tokens}) must not exceed "
                f"--kv-budget minus --kv-window ({cfg.budget - cfg.window}) for streamingllm")

    def select(self, scores: torch.Tensor | None, *, num_heads: int, prompt_lens: list[int],
               budgets: list[int], cfg: Any, device: Any = None) -> torch.Tensor:
        """Keep masks ``[R, H, Lmax]``; ``scores`` is ignored."""
        window = cfg.window
        selectable = check_rows(num_heads, prompt_lens, budgets, window)
        check_int("sink_tokens", cfg.sink_tokens, 0)
        width = max(prompt_lens)
        cand = torch.zeros(len(prompt_lens), num_heads, width - window, dtype=torch.bool,
                           device=device)
        for r, length in enumerate(prompt_lens):
            cand[r, :, : length - window] = streamingllm_mask(
                num_heads, length - window, selectable[r], cfg.sink_tokens, device=device)
        return with_window(cand, prompt_lens, window)

    def keep_masks(self, batch: LayerRows) -> torch.Tensor:
        return self.select(None, num_heads=batch.num_heads, prompt_lens=batch.prompt_lens,
                           budgets=batch.budgets, cfg=batch.cfg, device=batch.key_cache.device)

    def reselect(self, event: DecodeRows) -> torch.Tensor:
        """Each head's first ``sink_tokens`` candidates and its last
        ``budget - w - sink_tokens`` (all of them when they fit)."""
        selectable = check_decode_rows(event)
        return self.select_candidates(None, event.num_candidates, selectable, event.cfg,
                                      event.keys.shape[2])

    def select_candidates(self, scores: torch.Tensor | None, num_candidates: torch.Tensor,
                          selectable: list[int], cfg: Any, width: int) -> torch.Tensor:
        sinks = check_int("sink_tokens", cfg.sink_tokens, 0)
        if sinks > min(selectable):
            raise ValueError(f"streamingllm needs decode budget - window >= sink_tokens "
                             f"({sinks}), got {min(selectable)}")
        device = num_candidates.device
        n = num_candidates.long()[..., None]  # [R, H, 1]
        sel = on_device(selectable, torch.long, device)[:, None, None]
        pos = torch.arange(width, device=device)
        keep = (sel >= n) | (pos < sinks) | (pos >= n - (sel - sinks))
        return keep & (pos < n)
