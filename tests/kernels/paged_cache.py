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
