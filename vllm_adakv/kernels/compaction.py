"""Compaction: move each head's kept tokens into head-pages of the request's own blocks.

Torch reference. A head-page is one (block, slot) pair of a layer's cache,
addressed by the virtual page id ``block * H + slot``. Pages are handed out in
order: head 0 takes the first ceil(n_0 / bs) virtual pages of the request's
first blocks, head 1 the next ones, and so on, so a head's pages may sit in
any slot. Kept tokens stay in position order and keep their RoPE rotation.
"""

from __future__ import annotations

import torch


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


def pooled_layer_order(pages: torch.Tensor) -> torch.Tensor:
    """Layers ``[K]`` in ascending order of head-pages (stable): chunk k of the pooled
    sequence lies in the tensor of layer ``order[k]``."""
    return torch.sort(pages, stable=True).indices


def compact_pooled_reference(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_ids: torch.Tensor,
    keep_masks: torch.Tensor,
    layer_bases: torch.Tensor,
    kept_blocks: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Compact one request's kept tokens of all ``K`` layers of a group into head-pages
    pooled across the layers' tensors, in place.

    key_cache/value_cache: logical ``[NB, H, bs, D]`` views over every layer's blocks (layer
    k's block b is ``layer_bases[k] + b``). block_ids: the request's block table row.
    keep_masks: ``[K, H, L]``. kept_blocks: the request keeps blocks ``[0, m)`` in every
    layer tensor; None: the fewest that hold the kept pages, ``m = max(1, cdiv(sum pages,
    K * H))``. The pooled sequence has ``K`` chunks of ``C = m * H`` entries; chunk k is
    the tensor of layer ``order[k]`` (``pooled_layer_order``), entry e of a chunk block
    ``block_ids[e // H]``, slot ``e % H``. Layer ``order[i]`` owns the entries after those
    of ``order[:i]``, heads in order, so each head's pages are consecutive entries.

    Why in place is safe: the ``i`` smallest page counts sum to at most ``i * C``, so the
    layer placed i-th writes only to chunks ``<= i``, i.e. to its own tensor (gathered
    before writing) or to tensors of layers already compacted.

    Returns (page_start ``[K, H]`` int32 first entry of each head, counts ``[K, H]``
    int32, chunk_layer ``[K]`` int32 (= order), m).
    """
    num_layers, heads, _ = keep_masks.shape
    block_size = key_cache.shape[2]
    counts = keep_masks.sum(dim=2)  # [K, H]
    pages = (counts + block_size - 1) // block_size
    layer_pages = pages.sum(dim=1)
    total = int(layer_pages.sum())
    need = max(1, -(-total // (num_layers * heads)))
    if kept_blocks is None:
        kept_blocks = need
    elif need > kept_blocks:
        raise RuntimeError(
            f"compaction needs {total} head-pages over {num_layers} layers but only "
            f"{kept_blocks} blocks ({kept_blocks * heads * num_layers} pages) are reserved")
    capacity = kept_blocks * heads
    order = pooled_layer_order(layer_pages)
    blocks = block_ids.long()
    layer_start = torch.zeros(num_layers, dtype=torch.long, device=counts.device)
    layer_start[order] = torch.cumsum(layer_pages[order], 0) - layer_pages[order]
    page_start = layer_start[:, None] + torch.cumsum(pages, 1) - pages  # [K, H]
    for k in order.tolist():
        head_idx, pos = keep_masks[k].nonzero(as_tuple=True)
        src_block = layer_bases[k].long() + blocks[pos // block_size]
        # Gather first (a copy): this layer's sources and destinations may overlap.
        k_sel = key_cache[src_block, head_idx, pos % block_size]
        v_sel = value_cache[src_block, head_idx, pos % block_size]
        start = torch.cumsum(counts[k], 0) - counts[k]
        rank = torch.arange(pos.numel(), device=pos.device) - start[head_idx]
        entry = page_start[k, head_idx] + rank // block_size
        chunk, local = entry // capacity, entry % capacity
        dst_block = layer_bases.long()[order[chunk]] + blocks[local // heads]
        key_cache[dst_block, local % heads, rank % block_size] = k_sel
        value_cache[dst_block, local % heads, rank % block_size] = v_sel
    return page_start.to(torch.int32), counts.to(torch.int32), order.to(torch.int32), kept_blocks


def compact_pooled_rows_reference(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    block_rows: list[int],
    keep_masks: torch.Tensor,
    layer_bases: torch.Tensor,
    kept_blocks: list[int | None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``compact_pooled_reference`` for ``R`` requests: keep_masks ``[R, K, H, Lmax]``
    (False past each prompt). Returns (page_start ``[R, K, H]``, counts ``[R, K, H]``,
    chunk_layer ``[R, K]``, kept_blocks ``[R]``), all int32."""
    results = [compact_pooled_reference(key_cache, value_cache, block_table[b], keep_masks[r],
                                        layer_bases, kept_blocks[r])
               for r, b in enumerate(block_rows)]
    return (torch.stack([r[0] for r in results]), torch.stack([r[1] for r in results]),
            torch.stack([r[2] for r in results]),
            torch.tensor([r[3] for r in results], dtype=torch.int32))
