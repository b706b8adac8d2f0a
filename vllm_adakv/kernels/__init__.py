"""Compression kernels. Each has one signature; the torch reference is the first
implementation and the one the CPU path runs (Triton versions for CUDA share it)."""

from vllm_adakv.kernels.compaction import assign_head_pages, compact_reference
from vllm_adakv.kernels.decode import headwise_attention_reference
from vllm_adakv.kernels.scoring import gather_prompt_keys, pool_scores, score_window_reference

score_window = score_window_reference
compact = compact_reference
headwise_attention = headwise_attention_reference

__all__ = [
    "assign_head_pages",
    "compact",
    "compact_reference",
    "gather_prompt_keys",
    "headwise_attention",
    "headwise_attention_reference",
    "pool_scores",
    "score_window",
    "score_window_reference",
]
