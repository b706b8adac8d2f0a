"""Compression kernels. Each has one signature; the torch reference is the first
implementation and the one the CPU path runs. The dispatchers below run the
Triton version on CUDA tensors and the reference elsewhere (Ada-KV's safeguard:
``safeguard_caps`` and ``safeguard_caps_heads``, in ``allocation.py``). The head-wise
decode has one contract (page ranges) and no dispatcher: the CPU backend runs
``headwise_attention_ranges_reference``, the CUDA backend
``triton_decode.headwise_attention_ranges_triton`` (with its launch options)."""

from __future__ import annotations

import torch

from vllm_adakv.kernels.allocation import (
    safeguard_caps,
    safeguard_caps_heads,
    safeguard_caps_heads_reference,
    safeguard_caps_reference,
)
from vllm_adakv.kernels.compaction import (
    compact_decode_event_reference,
    compact_pooled_reference,
    compact_pooled_rows_reference,
    compact_ranges_reference,
    compact_rows_reference,
)
from vllm_adakv.kernels.decode import (
    headwise_attention_ranges_reference,
    masked_prompt_attention_reference,
    pooled_page_table,
)
from vllm_adakv.kernels.expected import score_expected, unrotated_moments_reference
from vllm_adakv.kernels.scoring import (
    gather_decode_candidates,
    gather_prompt_keys,
    pool_scores,
    score_decode_event_reference,
    score_window_reference,
    score_windows_reference,
)
from vllm_adakv.kernels.voting import (
    decode_voter_probs_event_reference,
    min_mass_above_reference,
    voter_probs_reference,
)


def compact_rows_ranges(key_cache: torch.Tensor, *args, **kwargs
                        ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``compact_rows_reference``'s contract (``dst_blocks`` included: in place without
    it), one ``(page_start, counts)`` per row; Triton (no host sync) on CUDA."""
    if key_cache.is_cuda:
        from vllm_adakv.kernels.triton_compaction import compact_rows_triton

        starts, counts = compact_rows_triton(key_cache, *args, **kwargs)
    else:
        starts, counts = compact_rows_reference(key_cache, *args, **kwargs)
    return list(zip(starts.unbind(0), counts.unbind(0), strict=True))


def compact_pooled_rows(key_cache: torch.Tensor, *args, **kwargs
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``compact_pooled_rows_reference``'s contract (``dst_blocks`` included: in place
    without it); Triton (no host sync) on CUDA."""
    if key_cache.is_cuda:
        from vllm_adakv.kernels.triton_compaction import compact_pooled_rows_triton

        return compact_pooled_rows_triton(key_cache, *args, **kwargs)
    return compact_pooled_rows_reference(key_cache, *args, **kwargs)


def compact_decode_event(key_cache: torch.Tensor, *args, **kwargs
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``compact_decode_event_reference``'s contract (one decode event's kept candidates
    into head-pages ``[0, P)``, in place; single-layer layout); Triton (no host sync) on
    CUDA."""
    if key_cache.is_cuda:
        from vllm_adakv.kernels.triton_recompact import compact_decode_event_triton

        return compact_decode_event_triton(key_cache, *args, **kwargs)
    return compact_decode_event_reference(key_cache, *args, **kwargs)


def score_windows(window_queries: torch.Tensor, key_cache: torch.Tensor, *args, **kwargs
                  ) -> torch.Tensor:
    """``score_windows_reference``'s contract; Triton on CUDA."""
    if key_cache.is_cuda:
        from vllm_adakv.kernels.triton_scoring import score_windows_triton

        return score_windows_triton(window_queries, key_cache, *args, **kwargs)
    return score_windows_reference(window_queries, key_cache, *args, **kwargs)


def score_decode_event(window_queries: torch.Tensor, key_cache: torch.Tensor, *args,
                       **kwargs) -> torch.Tensor:
    """``score_decode_event_reference``'s contract (one decode event's candidate scores,
    read in place from the paged layout); Triton (no host sync) on CUDA (float64: torch)."""
    if key_cache.is_cuda and window_queries.dtype != torch.float64:
        from vllm_adakv.kernels.triton_reselect import score_decode_event_triton

        return score_decode_event_triton(window_queries, key_cache, *args, **kwargs)
    return score_decode_event_reference(window_queries, key_cache, *args, **kwargs)


def unrotated_moments(query: torch.Tensor, *args, **kwargs
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``expected.unrotated_moments_reference``'s contract; Triton on CUDA (float64: torch)."""
    if query.is_cuda and query.dtype != torch.float64:
        from vllm_adakv.kernels.triton_expected import unrotated_moments_triton

        return unrotated_moments_triton(query, *args, **kwargs)
    return unrotated_moments_reference(query, *args, **kwargs)


def voter_probs(voters: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``voter_probs_reference``'s contract; Triton on CUDA."""
    if voters.is_cuda:
        from vllm_adakv.kernels.triton_voting import voter_probs_triton

        return voter_probs_triton(voters, *args, **kwargs)
    return voter_probs_reference(voters, *args, **kwargs)


def decode_voter_probs(voters: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``decode_voter_probs_event_reference``'s contract (one decode event's voter
    probabilities, read in place from the paged layout); Triton (no host sync) on CUDA
    (float64: torch)."""
    if voters.is_cuda and voters.dtype != torch.float64:
        from vllm_adakv.kernels.triton_decode_voting import decode_voter_probs_triton

        return decode_voter_probs_triton(voters, *args, **kwargs)
    return decode_voter_probs_event_reference(voters, *args, **kwargs)


def min_mass_above(probs: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``min_mass_above_reference``'s contract; Triton (no host sync) on CUDA."""
    if probs.is_cuda:
        from vllm_adakv.kernels.triton_voting import min_mass_above_triton

        return min_mass_above_triton(probs, *args, **kwargs)
    return min_mass_above_reference(probs, *args, **kwargs)


__all__ = [
    "compact_decode_event",
    "compact_decode_event_reference",
    "compact_pooled_reference",
    "compact_pooled_rows",
    "compact_pooled_rows_reference",
    "compact_ranges_reference",
    "compact_rows_ranges",
    "compact_rows_reference",
    "decode_voter_probs",
    "decode_voter_probs_event_reference",
    "gather_decode_candidates",
    "gather_prompt_keys",
    "headwise_attention_ranges_reference",
    "masked_prompt_attention_reference",
    "min_mass_above",
    "min_mass_above_reference",
    "pool_scores",
    "pooled_page_table",
    "safeguard_caps",
    "safeguard_caps_heads",
    "safeguard_caps_heads_reference",
    "safeguard_caps_reference",
    "score_decode_event",
    "score_decode_event_reference",
    "score_expected",
    "score_window_reference",
    "score_windows",
    "score_windows_reference",
    "unrotated_moments",
    "unrotated_moments_reference",
    "voter_probs",
    "voter_probs_reference",
]
