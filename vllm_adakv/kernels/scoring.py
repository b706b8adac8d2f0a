"""Scoring at the end of prefill: how much the observation window attends each key.

Torch reference. Shapes follow vLLM: query heads are grouped by KV head
(query head i reads KV head i // G). Caches are logical
``[num_blocks, H, block_size, D]`` views, whatever their physical packing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_prompt_keys(
    key_cache: torch.Tensor, block_ids: torch.Tensor, prompt_len: int
) -> torch.Tensor:
    """Keys of positions [0, prompt_len) of one request as ``[H, prompt_len, D]``."""
    block_size = key_cache.shape[2]
    num_blocks = -(-prompt_len // block_size)
    blocks = key_cache[block_ids[:num_blocks].long()]  # [nb, H, bs, D]
    heads, dim = blocks.shape[1], blocks.shape[3]
    return blocks.permute(1, 0, 2, 3).reshape(heads, num_blocks * block_size, dim)[:, :prompt_len]


def pool_scores(scores: torch.Tensor, pooling: str, kernel: int) -> torch.Tensor:
    """1-D pooling along positions, stride 1, same length. ``scores``: [H, C]."""
    if kernel == 1:
        return scores
    x = scores.unsqueeze(1)
    pad = kernel // 2
    if pooling == "max":
        pooled = F.max_pool1d(x, kernel, stride=1, padding=pad)
    elif pooling == "avg":
        pooled = F.avg_pool1d(x, kernel, stride=1, padding=pad, count_include_pad=False)
    else:
        raise ValueError(f"unknown pooling {pooling!r}")
    return pooled.squeeze(1)


def score_window_reference(
    window_query: torch.Tensor,
    key_cache: torch.Tensor,
    block_ids: torch.Tensor,
    prompt_len: int,
    scale: float,
    *,
    gqa_reduce: str,
    pooling: str,
    pool_kernel: int,
) -> torch.Tensor:
    """SnapKV scores of the candidates [0, prompt_len - w) for each KV head.

    window_query: ``[w, Hq, D]`` queries (after RoPE) of positions
        [prompt_len - w, prompt_len).
    Returns fp32 ``[H, prompt_len - w]``: softmax over all prompt keys (causal
    inside the window), summed over the window queries, reduced over each GQA
    group (mean or max, never repeating KV heads), then pooled.
    """
    w, num_q_heads, dim = window_query.shape
    keys = gather_prompt_keys(key_cache, block_ids, prompt_len).float()  # [H, L, D]
    heads = keys.shape[0]
    group = num_q_heads // heads
    q = window_query.float().reshape(w, heads, group, dim).permute(1, 2, 0, 3)  # [H, G, w, D]
    logits = torch.einsum("hgwd,hld->hgwl", q, keys) * scale
    q_pos = torch.arange(prompt_len - w, prompt_len, device=keys.device)
    k_pos = torch.arange(prompt_len, device=keys.device)
    logits.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
    attn = torch.softmax(logits, dim=-1).sum(dim=2)  # [H, G, L]
    if gqa_reduce == "mean":
        reduced = attn.mean(dim=1)
    elif gqa_reduce == "max":
        reduced = attn.amax(dim=1)
    else:
        raise ValueError(f"unknown gqa_reduce {gqa_reduce!r}")
    return pool_scores(reduced[:, : prompt_len - w], pooling, pool_kernel)
