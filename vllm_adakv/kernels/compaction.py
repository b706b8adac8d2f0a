"""Compaction: move each head's kept tokens into head-pages of the request's own blocks.

Torch reference. A head-page is one (block, slot) pair of a layer's cache,
addressed by the virtual page id ``block * H + slot``. Pages are handed out in
order: head 0 takes the first ceil(n_0 / bs) virtual pages of the request's
first blocks, head 1 the next ones, and so on, so a head's pages may sit in
any slot. Kept tokens stay in position order and keep their RoPE rotation.
"""

from __future__ import annotations

import torch


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


def compact_ranges_reference(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_ids: torch.Tensor,
    keep_mask: torch.Tensor,
    kept_blocks: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact one request's kept tokens of one layer, in place; pages as ranges.

    key_cache/value_cache: logical ``[num_blocks, H, bs, D]`` views of the layer.
    block_ids: the request's block table row (positions -> blocks, as vLLM has it).
    keep_mask: ``[H, L]`` bool over prompt positions.
    kept_blocks: pages must fit in the request's first ``kept_blocks`` blocks.
    Returns (page_start ``[H]`` int32: index of each head's first page in the
    request's head-page sequence, entry i being block ``block_ids[i // H]``, slot
    ``i % H``; counts ``[H]`` int32 kept tokens per head). A head's pages follow
    one another in that sequence.
    """
    heads, _ = keep_mask.shape
    block_size = key_cache.shape[2]
    counts = keep_mask.sum(dim=1)
    pages = (counts + block_size - 1) // block_size
    offset = torch.cumsum(pages, 0) - pages
    total_pages = int(pages.sum().item())
    if total_pages > kept_blocks * heads:
        raise RuntimeError(
            f"compaction needs {total_pages} head-pages but only {kept_blocks} blocks "
            f"({kept_blocks * heads} pages) are reserved"
        )
    head_idx, pos = keep_mask.nonzero(as_tuple=True)  # row-major: by head, then position
    blocks = block_ids.long()
    # Gather first (a copy): sources and destinations overlap in the first blocks.
    k_sel = key_cache[blocks[pos // block_size], head_idx, pos % block_size]
    v_sel = value_cache[blocks[pos // block_size], head_idx, pos % block_size]
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(pos.numel(), device=pos.device) - start[head_idx]  # t within head
    seq = offset[head_idx] + rank // block_size
    dst_block = blocks[seq // heads]
    dst_slot = seq % heads
    dst_off = rank % block_size
    key_cache[dst_block, dst_slot, dst_off] = k_sel
    value_cache[dst_block, dst_slot, dst_off] = v_sel
    return offset.to(torch.int32), counts.to(torch.int32)


def compact_rows_reference(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    block_rows: list[int],
    keep_masks: torch.Tensor,
    kept_blocks: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``compact_ranges_reference`` for ``R`` requests of one layer.

    Request ``r``: blocks ``block_table[block_rows[r]]``, mask ``keep_masks[r]``
    (``[H, Lmax]``, False past its prompt), ``kept_blocks[r]`` reserved blocks.
    Returns (page_start, counts), both int32 ``[R, H]``.
    """
    results = [compact_ranges_reference(key_cache, value_cache, block_table[b], keep_masks[r],
                                        kept_blocks[r])
               for r, b in enumerate(block_rows)]
    return (torch.stack([p for p, _ in results]), torch.stack([c for _, c in results]))


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
