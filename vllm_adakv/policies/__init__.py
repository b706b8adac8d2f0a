"""Compression policies: per-head keep sets from (pooled, GQA-reduced) scores.

Pure torch, no vLLM imports. Notation: ``H`` KV heads, prompt length ``L``, window ``w``
(the last ``w`` prompt tokens, always kept), candidates ``0..C-1`` with ``C = L - w``,
``layer_budget`` = tokens kept per head on average *including* the window.
"""

from __future__ import annotations

import torch

from vllm_adakv.tensors import on_device

from .adakv import adakv_counts, adakv_counts_rows
from .common import check_int, check_scores, topk_mask, topk_masks
from .gvote import gvote_keep_mask, layer_seed
from .pyramidkv import pyramid_layer_budgets
from .snapkv import snapkv_counts
from .streamingllm import streamingllm_mask

# Methods with a fixed per-layer budget: select_keep_mask / keep_counts handle them.
BUDGET_METHODS = ("none", "snapkv", "adakv", "pyramidkv", "streamingllm")
# Budget-free methods: the keep-set comes from queries and keys (gvote_keep_mask).
VOTE_METHODS = ("gvote",)
METHODS = BUDGET_METHODS + VOTE_METHODS
SCORED_METHODS = ("snapkv", "adakv", "pyramidkv")

__all__ = [
    "BUDGET_METHODS",
    "METHODS",
    "SCORED_METHODS",
    "VOTE_METHODS",
    "adakv_counts",
    "gvote_keep_mask",
    "keep_counts",
    "layer_budget",
    "layer_seed",
    "pyramid_layer_budgets",
    "select_keep_mask",
    "select_keep_masks",
    "snapkv_counts",
    "streamingllm_mask",
    "topk_mask",
]


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}; expected one of {METHODS}")


def layer_budget(method: str, budget: int, layer_idx: int, num_layers: int, window: int,
                 beta: float = 20.0) -> int:
    """Budget (tokens per head incl. window) of layer ``layer_idx`` under ``method``."""
    _check_method(method)
    num_layers = check_int("num_layers", num_layers, 1)
    layer_idx = check_int("layer_idx", layer_idx, 0)
    if layer_idx >= num_layers:
        raise ValueError(f"layer_idx {layer_idx} out of range for num_layers={num_layers}")
    if method == "pyramidkv":
        return pyramid_layer_budgets(budget, num_layers, window, beta)[layer_idx]
    return check_int("budget", budget, 0)


def _validate(method: str, scores: torch.Tensor | None, num_heads: int, prompt_len: int,
              window: int, layer_budget: int) -> tuple[int, int]:
    """Check the common arguments; return ``(num_candidates, selectable)``."""
    _check_method(method)
    if method in VOTE_METHODS:
        raise ValueError(f"{method!r} has no fixed budget and votes with queries and keys: "
                         f"call gvote_keep_mask")
    num_heads = check_int("num_heads", num_heads, 1)
    prompt_len = check_int("prompt_len", prompt_len, 1)
    window = check_int("window", window, 0)
    if prompt_len <= window:
        raise ValueError(f"prompt_len ({prompt_len}) must exceed window ({window})")
    num_candidates = prompt_len - window
    if method == "none":
        return num_candidates, num_candidates
    layer_budget = check_int("layer_budget", layer_budget, 0)
    if layer_budget < window:
        raise ValueError(
            f"layer_budget ({layer_budget}) must be >= window ({window}): the budget "
            f"includes the window"
        )
    if method in SCORED_METHODS:
        if scores is None:
            raise ValueError(f"method {method!r} needs scores of shape [H, prompt_len - window]")
        check_scores(scores, num_heads, num_candidates)
    return num_candidates, layer_budget - window


def _device(scores: torch.Tensor | None, device: torch.device | str | None):
    if device is not None:
        return device
    return scores.device if scores is not None else None


def keep_counts(method: str, scores: torch.Tensor | None, *, num_heads: int, prompt_len: int,
                window: int, layer_budget: int, alpha: float, sink_tokens: int,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Tokens kept per KV head, window included: LongTensor ``[H]``.

    Equals ``select_keep_mask(...).sum(1)`` for the same arguments.
    """
    num_candidates, selectable = _validate(method, scores, num_heads, prompt_len, window,
                                           layer_budget)
    dev = _device(scores, device)
    if method == "adakv":
        return window + adakv_counts(scores, selectable, alpha).to(dev)
    if method == "streamingllm":
        check_int("sink_tokens", sink_tokens, 0)
        if sink_tokens > selectable:
            raise ValueError(f"streamingllm needs layer_budget - window >= sink_tokens "
                             f"({layer_budget} - {window} < {sink_tokens})")
    # none / snapkv / pyramidkv / streamingllm: uniform
    return window + snapkv_counts(num_heads, num_candidates, selectable, device=dev)


def select_keep_mask(method: str, scores: torch.Tensor | None, *, num_heads: int,
                     prompt_len: int, window: int, layer_budget: int, alpha: float,
                     sink_tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool mask ``[H, prompt_len]`` (True = kept) for one layer.

    Window positions ``[L - w, L)`` are always kept. ``scores`` (``[H, L - w]``) are needed
    for the scored methods and ignored otherwise. Ties prefer the lower position index.
    The mask lives on ``device`` if given, else on ``scores.device`` (CPU without scores).
    """
    _validate(method, scores, num_heads, prompt_len, window, layer_budget)
    return select_keep_masks(
        method, None if scores is None else scores[None], num_heads=num_heads,
        prompt_lens=[prompt_len], window=window, layer_budgets=[layer_budget], alpha=alpha,
        sink_tokens=sink_tokens, device=device)[0]


def select_keep_masks(method: str, scores: torch.Tensor | None, *, num_heads: int,
                      prompt_lens: list[int], window: int, layer_budgets: list[int],
                      alpha: float, sink_tokens: int,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """``select_keep_mask`` for ``R`` requests of one layer at once: bool ``[R, H, Lmax]``.

    Row ``r`` is request ``r`` (prompt ``prompt_lens[r]``, budget ``layer_budgets[r]``);
    ``scores`` is ``[R, H, Lmax - w]`` with row ``r``'s candidates first (the rest is
    padding, never kept). Row ``r`` equals ``select_keep_mask(method, scores[r, :, :C_r],
    prompt_len=prompt_lens[r], layer_budget=layer_budgets[r], ...)`` padded with False.
    """
    rows = len(prompt_lens)
    if len(layer_budgets) != rows:
        raise ValueError(f"{rows} prompt lengths but {len(layer_budgets)} budgets")
    selectable = []
    for r, (length, budget) in enumerate(zip(prompt_lens, layer_budgets, strict=True)):
        row_scores = None
        if scores is not None and method in SCORED_METHODS:
            if scores.dim() != 3 or scores.shape[0] != rows or scores.shape[1] != num_heads \
                    or scores.shape[2] < length - window:
                raise ValueError(f"scores of shape {tuple(scores.shape)} do not hold {rows} "
                                 f"rows of [{num_heads}, >= {length - window}]")
            row_scores = scores[r, :, : length - window]
        selectable.append(_validate(method, row_scores, num_heads, length, window, budget)[1])
    dev = _device(scores, device)
    width = max(prompt_lens)
    candidates = [length - window for length in prompt_lens]
    pos = torch.arange(width, device=dev)
    lengths = on_device(prompt_lens, torch.long, dev)[:, None, None]
    in_prompt = pos < lengths  # [R, 1, width]
    if method == "none":
        return in_prompt.expand(rows, num_heads, width).clone()
    if method == "streamingllm":
        cand = torch.zeros(rows, num_heads, width - window, dtype=torch.bool, device=dev)
        for r in range(rows):
            check_int("sink_tokens", sink_tokens, 0)
            cand[r, :, : candidates[r]] = streamingllm_mask(
                num_heads, candidates[r], selectable[r], sink_tokens, device=dev)
    else:
        assert scores is not None
        scores = scores[..., : width - window]
        # Host-side bounds on the counts: no read-back from the device.
        if method == "adakv":
            counts = adakv_counts_rows(scores, candidates, selectable, alpha)
            bound = max(candidates)
        else:
            counts = on_device([min(s, c) for s, c in zip(selectable, candidates, strict=True)],
                               torch.long, scores.device)[:, None].expand(rows, num_heads)
            bound = max(min(s, c) for s, c in zip(selectable, candidates, strict=True))
        cand = topk_masks(scores, counts, candidates, max_count=bound).to(dev)
    # Row r: candidates [0, C_r), then its window [C_r, L_r).
    window_part = (pos >= lengths - window) & in_prompt
    mask = torch.zeros(rows, num_heads, width, dtype=torch.bool, device=dev)
    mask[..., : width - window] = cand
    return mask | window_part
