"""Test helpers: random paged caches with known per-position K/V."""

from __future__ import annotations

import torch


def random_block_tables(lengths: list[int], block_size: int, extra_blocks: int = 2,
                        spare: int = 3) -> tuple[torch.Tensor, int]:
    """Disjoint, shuffled block ids per request (block 0 kept free as vLLM's null block)."""
    need = [-(-n // block_size) + extra_blocks for n in lengths]
    total = sum(need) + spare + 1
    perm = torch.randperm(total - 1) + 1
    width = max(need)
    table = torch.zeros(len(lengths), width, dtype=torch.int32)
    start = 0
    for r, n in enumerate(need):
        table[r, :n] = perm[start : start + n].to(torch.int32)
        start += n
    return table, total


def write_tokens(key_cache: torch.Tensor, value_cache: torch.Tensor, block_row: torch.Tensor,
                 positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Store keys/values ``[T, H, D]`` at ``positions`` in the normal (position) layout."""
    block_size = key_cache.shape[2]
    blocks = block_row.long()[positions // block_size]
    key_cache[blocks, :, positions % block_size] = keys
    value_cache[blocks, :, positions % block_size] = values


def assert_pooled_triton_matches_reference(kv, dim, table, block_rows, masks, layer_bases,
                                           kept_blocks, dst_blocks=None) -> None:
    """``compact_pooled_rows_triton`` on ``kv`` (keys ``[..., :dim]``, values after) gives
    the reference's outputs (int32) and leaves the cache byte for byte as the reference
    leaves a copy of it."""
    from vllm_adakv.kernels.compaction import compact_pooled_rows_reference
    from vllm_adakv.kernels.triton_compaction import compact_pooled_rows_triton

    want_kv = kv.clone()
    want = compact_pooled_rows_reference(want_kv[..., :dim], want_kv[..., dim:], table,
                                         block_rows, masks, layer_bases, kept_blocks,
                                         dst_blocks=dst_blocks)
    got = compact_pooled_rows_triton(kv[..., :dim], kv[..., dim:], table, block_rows, masks,
                                     layer_bases, kept_blocks, dst_blocks=dst_blocks)
    for name, g, w in zip(("page_start", "counts", "chunk_layer", "kept_blocks"), got, want,
                          strict=True):
        assert g.dtype == torch.int32 and torch.equal(g, w), name
    assert torch.equal(kv.view(torch.uint8), want_kv.view(torch.uint8)), \
        "caches differ after compaction (exact copy expected)"
