"""Test-only references and one-request entry points of the kernels.

Nothing in the package runs these: the CUDA backend calls the Triton kernels over row
tables, the CPU backend the torch references of ``vllm_adakv.kernels`` directly. The tests
use them to check the kernels against one another: the page-table forms below list each
head's pages explicitly, an independent way to state where compaction put them.
"""

from __future__ import annotations

import torch

from vllm_adakv.kernels.compaction import compact_ranges_reference
from vllm_adakv.kernels.decode import _attend_tables
from vllm_adakv.kernels.triton_compaction import compact_rows_triton
from vllm_adakv.kernels.triton_scoring import score_windows_triton


def assign_head_pages(
    counts: torch.Tensor, block_ids: torch.Tensor, num_kv_heads: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Virtual page ids per head and each head's first virtual page index.

    counts: ``[H]`` kept tokens per head. Returns (page_table ``[H, max_pages]`` int32
    padded with -1, page_offset ``[H]`` int64 index of the head's first page within
    the request's page sequence).
    """
    pages = (counts.long() + block_size - 1) // block_size
    offset = torch.cumsum(pages, 0) - pages
    max_pages = max(int(pages.max().item()), 1)
    j = torch.arange(max_pages, device=counts.device)
    seq = offset[:, None] + j[None, :]  # index in the request's page sequence
    valid = j[None, :] < pages[:, None]
    seq = torch.where(valid, seq, torch.zeros_like(seq))
    virt = block_ids.long()[seq // num_kv_heads] * num_kv_heads + seq % num_kv_heads
    page_table = torch.where(valid, virt, torch.full_like(virt, -1)).to(torch.int32)
    return page_table, offset


def compact_reference(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_ids: torch.Tensor,
    keep_mask: torch.Tensor,
    kept_blocks: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like ``compact_ranges_reference``, with each head's pages listed explicitly.

    Returns (page_table ``[H, max_pages]`` int32 virtual page ids, -1 padded;
    counts ``[H]`` int32).
    """
    _, counts = compact_ranges_reference(key_cache, value_cache, block_ids, keep_mask,
                                         kept_blocks)
    page_table, _ = assign_head_pages(counts, block_ids, keep_mask.shape[0], key_cache.shape[2])
    return page_table, counts


def headwise_attention_reference(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
    page_table: torch.Tensor, kept_counts: torch.Tensor, block_table: torch.Tensor,
    tail_start: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
    scale: float, out: torch.Tensor,
) -> torch.Tensor:
    """Head-wise attention over explicit page tables (``page_table`` ``[R, H, P]`` virtual
    page ids, -1 padded; one block table row per row; rows' queries consecutive): the core
    of ``decode.headwise_attention_ranges_reference``, for tests that list pages by hand
    (``compact_reference``)."""
    return _attend_tables(query, key_cache, value_cache, page_table, kept_counts,
                          block_table, tail_start, seq_lens, query_start_loc, scale, out)


def compact_ranges_triton(key_cache: torch.Tensor, value_cache: torch.Tensor,
                          block_ids: torch.Tensor, keep_mask: torch.Tensor, kept_blocks: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact one request's kept tokens of one layer in place (``compact_rows_triton`` on
    one row); contract of ``compaction.compact_ranges_reference``."""
    page_start, counts = compact_rows_triton(key_cache, value_cache, block_ids[None], [0],
                                             keep_mask[None], [kept_blocks])
    return page_start[0], counts[0]


def score_window_triton(window_query: torch.Tensor, key_cache: torch.Tensor,
                        block_ids: torch.Tensor, prompt_len: int, scale: float, *,
                        gqa_reduce: str, pooling: str, pool_kernel: int,
                        num_splits: int | None = None, k_scale: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """SnapKV scores ``[H, prompt_len - w]`` (fp32) of one request (``score_windows_triton``
    on one row); contract of ``scoring.score_window_reference``."""
    return score_windows_triton(window_query[None], key_cache, block_ids[None], [0],
                                [prompt_len], scale, gqa_reduce=gqa_reduce, pooling=pooling,
                                pool_kernel=pool_kernel, num_splits=num_splits,
                                k_scale=k_scale)[0]
