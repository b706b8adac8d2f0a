"""One-layer calls of the registry's methods by name, as the tests use them.

Each goes through the method object the engine uses (``get_method(name)``); only the
argument plumbing is here. ``keep_counts`` reads the method's own count rule
(``Method.counts``), not the mask, so the tests comparing the two can fail.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from vllm_adakv.methods import REGISTRY, get_method
from vllm_adakv.methods.common import check_scores
from vllm_adakv.methods.snapkv import SnapKV, check_rows

# Methods with a fixed per-layer budget (measured methods vote: gvote_keep_mask).
BUDGET_METHODS = tuple(n for n, m in REGISTRY.items() if not m.measured)
SCORED_METHODS = tuple(n for n, m in REGISTRY.items() if isinstance(m, SnapKV))


def _settings(window: int, alpha: float = 0.2, sink_tokens: int = 4, budget: int = 0,
              pyramid_beta: float = 20.0) -> SimpleNamespace:
    return SimpleNamespace(window=window, alpha=alpha, sink_tokens=sink_tokens,
                           budget=budget, pyramid_beta=pyramid_beta)


def _budget_method(method: str):
    m = get_method(method)
    if m.measured:
        raise ValueError(f"{method!r} has no fixed budget and votes with queries and keys: "
                         f"call gvote_keep_mask")
    return m


def select_keep_masks(method: str, scores: torch.Tensor | None, *, num_heads: int,
                      prompt_lens: list[int], window: int, layer_budgets: list[int],
                      alpha: float, sink_tokens: int, device=None) -> torch.Tensor:
    """Keep masks ``[R, H, Lmax]`` of ``R`` requests of one layer."""
    m = _budget_method(method)
    return m.select(scores if isinstance(m, SnapKV) else None, num_heads=num_heads,
                    prompt_lens=list(prompt_lens), budgets=list(layer_budgets),
                    cfg=_settings(window, alpha, sink_tokens), device=device)


def select_keep_mask(method: str, scores: torch.Tensor | None, *, num_heads: int,
                     prompt_len: int, window: int, layer_budget: int, alpha: float,
                     sink_tokens: int, device=None) -> torch.Tensor:
    """Bool mask ``[H, prompt_len]`` of one request."""
    if scores is not None and isinstance(get_method(method), SnapKV):
        check_scores(scores)
        scores = scores[None]
    else:
        scores = None
    return select_keep_masks(method, scores, num_heads=num_heads, prompt_lens=[prompt_len],
                             window=window, layer_budgets=[layer_budget], alpha=alpha,
                             sink_tokens=sink_tokens, device=device)[0]


def keep_counts(method: str, scores: torch.Tensor | None, *, num_heads: int, prompt_len: int,
                window: int, layer_budget: int, alpha: float, sink_tokens: int,
                device=None) -> torch.Tensor:
    """Tokens kept per KV head, window included, by the method's count rule: ``[H]``."""
    m = _budget_method(method)
    cfg = _settings(window, alpha, sink_tokens)
    (selectable,) = check_rows(num_heads, [prompt_len], [layer_budget], window, m.compresses)
    candidates = prompt_len - window
    if m.name == "streamingllm" and sink_tokens > selectable:
        raise ValueError(f"streamingllm needs layer_budget - window >= sink_tokens "
                         f"({layer_budget} - {window} < {sink_tokens})")
    if isinstance(m, SnapKV):
        if scores is None:
            raise ValueError(f"method {method!r} needs scores of shape [H, prompt_len - window]")
        check_scores(scores, num_heads, candidates)
        counts, _ = m.counts(scores[None], [candidates], [selectable], cfg)
        return window + counts[0].to(device or scores.device)
    return torch.full((num_heads,), window + min(selectable, candidates), dtype=torch.long,
                      device=device)


def layer_budget(method: str, budget: int, layer_idx: int, num_layers: int, window: int,
                 beta: float = 20.0) -> int:
    """Budget of one layer under ``method`` for a prompt longer than every layer's."""
    if not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx {layer_idx} out of range for num_layers={num_layers}")
    budgets = get_method(method).layer_budgets(
        _settings(window, budget=budget, pyramid_beta=beta), 1 << 40, num_layers)
    return budgets[layer_idx]
