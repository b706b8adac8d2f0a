"""Test-only references and one-request entry points of the kernels.

Nothing in the package runs these: the CUDA backend calls the Triton kernels over row
tables, the CPU backend the torch references of ``vllm_adakv.kernels`` directly. The tests
use them to check the kernels against one another.
"""

from __future__ import annotations

import torch

from vllm_adakv.kernels.decode import headwise_attention_reference, pooled_page_table
from vllm_adakv.kernels.triton_compaction import compact_rows_triton
from vllm_adakv.kernels.triton_scoring import score_windows_triton


def headwise_attention_ranges_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    page_start: torch.Tensor,
    kept_counts: torch.Tensor,
    block_table: torch.Tensor,
    rows: torch.Tensor,
    num_row_tokens: int,
    scale: float,
    out: torch.Tensor,
    chunk_base: torch.Tensor | None = None,
    capacity: torch.Tensor | None = None,
    layer_base: int = 0,
) -> torch.Tensor:
    """Head-wise attention for selected batch rows, with pages given as ranges.

    page_start/kept_counts: ``[S, H]``: head h of the request in slot s owns the
    ``ceil(kept_counts[s, h] / bs)`` head-pages starting at entry
    ``page_start[s, h]`` of its head-page sequence. block_table: ``[B, NB]`` of the
    whole batch. rows: int32 ``[R, 7]`` (batch row, slot, q_start, q_end,
    tail_start, seq_len, scratch offset; see ``vllm_adakv.kernels.triton_decode.row_table``).
    Single layer (``chunk_base`` None): entry i = block ``block_table[b, i // H]``, slot
    ``i % H`` of ``key_cache``. Pooled over layers: ``key_cache``/``value_cache`` view all
    layers' blocks (layer tensors at block offsets), ``chunk_base`` ``[S, K]`` and
    ``capacity`` ``[S]`` place entry g as in ``decode.pooled_page_table``, and this layer's tail
    blocks are ``layer_base + block_table[b, pos // bs]``.
    ``num_row_tokens`` (scratch size of the Triton version) is unused here.
    Only the rows' query tokens ``out[q_start:q_end]`` are written.
    """
    del num_row_tokens
    heads, block_size = key_cache.shape[1], key_cache.shape[2]
    for b, s, q0, q1, tail, seq, _ in rows.tolist():
        block_row = block_table[b].long()
        table = pooled_page_table(
            page_start[s], kept_counts[s], block_row, heads, block_size,
            None if chunk_base is None else chunk_base[s],
            None if capacity is None else int(capacity[s]))
        headwise_attention_reference(
            query, key_cache, value_cache, table[None], kept_counts[s][None],
            (block_row + layer_base)[None], torch.tensor([tail]), torch.tensor([seq]),
            torch.tensor([q0, q1]), scale, out,
        )
    return out


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
                        num_splits: int | None = None) -> torch.Tensor:
    """SnapKV scores ``[H, prompt_len - w]`` (fp32) of one request (``score_windows_triton``
    on one row); contract of ``scoring.score_window_reference``."""
    return score_windows_triton(window_query[None], key_cache, block_ids[None], [0],
                                [prompt_len], scale, gqa_reduce=gqa_reduce, pooling=pooling,
                                pool_kernel=pool_kernel, num_splits=num_splits)[0]
