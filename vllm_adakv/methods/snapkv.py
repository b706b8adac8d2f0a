"""SnapKV: every head keeps its own top-B' candidates (uniform budget) by a scorer's scores.

Scores (shared by the scored methods, ``methods.scorers``): by default the last ``w``
prompt queries attend over the candidates (``kernels.score_windows``: softmax per query,
summed over the window, reduced over each GQA group, pooled along positions).
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_adakv.kernels.scoring import score_decode_windows_reference
from vllm_adakv.tensors import on_device

from .base import DecodeRows, LayerRows, Method, check_decode_rows, with_window
from .common import check_int, check_scores, head_topk_masks, topk_masks
from .scorers import SCORERS


def snapkv_counts(num_heads: int, num_candidates: int, selectable: int,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Candidates kept per head (window excluded): ``min(selectable, C)`` for every head."""
    num_heads = check_int("num_heads", num_heads, 1)
    num_candidates = check_int("num_candidates", num_candidates, 0)
    selectable = check_int("selectable", selectable, 0)
    return torch.full((num_heads,), min(selectable, num_candidates), dtype=torch.long,
                      device=device)


def check_rows(num_heads: int, prompt_lens: list[int], budgets: list[int], window: int,
               compresses: bool = True) -> list[int]:
    """Validate one layer's rows; returns each row's selectable count ``budget - w``
    (``C`` when nothing is compressed)."""
    if len(budgets) != len(prompt_lens):
        raise ValueError(f"{len(prompt_lens)} prompt lengths but {len(budgets)} budgets")
    check_int("num_heads", num_heads, 1)
    window = check_int("window", window, 0)
    selectable = []
    for length, budget in zip(prompt_lens, budgets, strict=True):
        length = check_int("prompt_len", length, 1)
        if length <= window:
            raise ValueError(f"prompt_len ({length}) must exceed window ({window})")
        if not compresses:
            selectable.append(length - window)
            continue
        budget = check_int("layer_budget", budget, 0)
        if budget < window:
            raise ValueError(f"layer_budget ({budget}) must be >= window ({window}): the "
                             "budget includes the window")
        selectable.append(budget - window)
    return selectable


class SnapKV(Method):
    """Top-B' window-scored candidates per head, the same count for every head."""

    name = "snapkv"
    needs_window_queries = True
    takes_scorer = True
    kernels = frozenset({"scoring"})

    def scores(self, batch: LayerRows) -> torch.Tensor:
        """Scores ``[R, H, >= Lmax - w]`` of the batch's candidates by its scorer
        (``cfg.scorer``)."""
        return SCORERS[batch.cfg.scorer].scores(batch)

    def counts(self, scores: torch.Tensor, num_candidates: list[int], selectable: list[int],
               cfg: Any) -> tuple[torch.Tensor, int]:
        """Candidates kept per head ``[R, H]`` and a host bound on them."""
        kept = [min(s, c) for s, c in zip(selectable, num_candidates, strict=True)]
        rows, heads = scores.shape[:2]
        return on_device(kept, torch.long, scores.device)[:, None].expand(rows, heads), max(kept)

    def select(self, scores: torch.Tensor | None, *, num_heads: int, prompt_lens: list[int],
               budgets: list[int], cfg: Any, device: Any = None) -> torch.Tensor:
        """Keep masks ``[R, H, Lmax]`` from window scores ``[R, H, >= Lmax - w]`` (row
        ``r``'s candidates first, padding after: never kept). ``cfg`` gives ``window``
        (and what ``counts`` reads). Ties prefer the lower position."""
        window = cfg.window
        selectable = check_rows(num_heads, prompt_lens, budgets, window)
        candidates = [n - window for n in prompt_lens]
        if scores is None:
            raise ValueError(f"method {self.name!r} needs scores of shape "
                             "[R, H, prompt_len - window]")
        if not isinstance(scores, torch.Tensor):
            raise ValueError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
        if scores.dim() != 3 or scores.shape[0] != len(prompt_lens) \
                or scores.shape[1] != num_heads or scores.shape[2] < max(candidates):
            raise ValueError(f"scores of shape {tuple(scores.shape)} do not hold "
                             f"{len(prompt_lens)} rows of [{num_heads}, >= {max(candidates)}]")
        for r, c in enumerate(candidates):
            check_scores(scores[r, :, :c], num_heads, c)
        scores = scores[..., : max(candidates)]
        counts, bound = self.counts(scores, candidates, selectable, cfg)
        cand = topk_masks(scores, counts, candidates, max_count=bound)
        return with_window(cand.to(device or scores.device), prompt_lens, window)

    def keep_masks(self, batch: LayerRows) -> torch.Tensor:
        return self.select(self.scores(batch), num_heads=batch.num_heads,
                           prompt_lens=batch.prompt_lens, budgets=batch.budgets,
                           cfg=batch.cfg, device=batch.key_cache.device)

    def decode_scores(self, event: DecodeRows) -> torch.Tensor:
        """Window scores ``[R, H, Cmax]`` of a decode event's candidates (-inf padding):
        always the window's own queries, whatever ``cfg.scorer`` (decoding has them)."""
        cfg = event.cfg
        return score_decode_windows_reference(
            event.window_queries, event.keys, event.num_candidates, event.window_keys,
            event.scale, gqa_reduce=cfg.gqa_reduce, pooling=cfg.pooling,
            pool_kernel=cfg.pool_kernel)

    def decode_counts(self, scores: torch.Tensor, num_candidates: torch.Tensor,
                      selectable: list[int], cfg: Any) -> tuple[torch.Tensor, int]:
        """Candidates kept per head ``[R, H]`` at a decode event and a host bound on them:
        ``min(budget - w, n)`` for each head."""
        sel = on_device(selectable, torch.long, scores.device)[:, None]
        return torch.minimum(num_candidates.to(scores.device).long(), sel), max(selectable)

    def reselect(self, event: DecodeRows) -> torch.Tensor:
        """Each head's top candidates by the decode window's scores (``decode_counts`` of
        them; ties: the older token)."""
        selectable = check_decode_rows(event)
        return self.select_candidates(self.decode_scores(event), event.num_candidates,
                                      selectable, event.cfg, event.keys.shape[2])

    def select_candidates(self, scores: torch.Tensor | None, num_candidates: torch.Tensor,
                          selectable: list[int], cfg: Any, width: int) -> torch.Tensor:
        if scores is None or scores.shape[2] != width:
            raise ValueError(f"{self.name} selects by scores [R, H, {width}]")
        counts, bound = self.decode_counts(scores, num_candidates, selectable, cfg)
        return head_topk_masks(scores, counts, num_candidates, min(bound, width))
