"""Compaction: move each head's kept tokens into head-pages of destination blocks.

Torch reference. A head-page is one (block, slot) pair of a layer's cache,
addressed by the virtual page id ``block * H + slot``. The destination blocks of a
request form its head-page sequence, entry i being block ``dst[i // H]``, slot
``i % H``; pages are handed out in order: head 0 takes the first ceil(n_0 / bs)
entries, head 1 the next ones, and so on, so a head's pages may sit in any slot.
Kept tokens stay in position order and keep their RoPE rotation.

Sources are always the request's block table row (position p in block
``block_ids[p // bs]``). Destinations are either that same row (``dst_blocks=None``:
in place, into the request's first blocks) or blocks given apart (``dst_blocks``:
e.g. fresh blocks, so that blocks shared with other requests or hashed in the prefix
cache are never written). Given destinations must not be source blocks of the
compaction (of any request compacted with it); their count is checked.

Compaction copies bytes: caches of any dtype, fp8 included (moved through a uint8 view,
``kernels.fp8``; no scale is involved).
"""

from __future__ import annotations

import torch

from vllm_adakv.kernels.fp8 import as_bytes


def compact_ranges_reference(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_ids: torch.Tensor,
    keep_mask: torch.Tensor,
    kept_blocks: int,
    dst_blocks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact one request's kept tokens of one layer; pages as ranges.

    key_cache/value_cache: logical ``[num_blocks, H, bs, D]`` views of the layer.
    block_ids: the request's block table row (positions -> blocks, as vLLM has it): the
    sources. keep_mask: ``[H, L]`` bool over prompt positions.
    kept_blocks: pages must fit in ``kept_blocks`` destination blocks.
    dst_blocks: 1-D integer tensor of at least ``kept_blocks`` destination block ids, none
    of them a source block; None: ``block_ids`` (in place, the request's first blocks).
    Returns (page_start ``[H]`` int32: index of each head's first page in the
    request's head-page sequence, entry i being block ``dst[i // H]``, slot
    ``i % H``; counts ``[H]`` int32 kept tokens per head). A head's pages follow
    one another in that sequence.
    """
    heads, _ = keep_mask.shape
    block_size = key_cache.shape[2]
    dst = _destinations(block_ids, dst_blocks, kept_blocks)
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
    key_cache, value_cache = as_bytes(key_cache), as_bytes(value_cache)
    # Gather first (a copy): in place, sources and destinations overlap in the first blocks.
    k_sel = key_cache[blocks[pos // block_size], head_idx, pos % block_size]
    v_sel = value_cache[blocks[pos // block_size], head_idx, pos % block_size]
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(pos.numel(), device=pos.device) - start[head_idx]  # t within head
    seq = offset[head_idx] + rank // block_size
    dst_block = dst[seq // heads]
    dst_slot = seq % heads
    dst_off = rank % block_size
    key_cache[dst_block, dst_slot, dst_off] = k_sel
    value_cache[dst_block, dst_slot, dst_off] = v_sel
    return offset.to(torch.int32), counts.to(torch.int32)


def _destinations(block_ids: torch.Tensor, dst_blocks: torch.Tensor | None,
                  kept_blocks: int) -> torch.Tensor:
    """The destination blocks (int64): ``dst_blocks``, at least ``kept_blocks`` of them,
    or ``block_ids`` (in place)."""
    if dst_blocks is None:
        return block_ids.long()
    if dst_blocks.dim() != 1 or dst_blocks.numel() < kept_blocks:
        raise RuntimeError(
            f"compaction needs {kept_blocks} destination blocks but dst_blocks has shape "
            f"{tuple(dst_blocks.shape)} (1-D, at least {kept_blocks} ids)")
    return dst_blocks.to(block_ids.device).long()


def _dst_row(dst_blocks: torch.Tensor | None, r: int) -> torch.Tensor | None:
    """Row ``r`` of a ``[R, W]`` destination table (None: in place)."""
    return None if dst_blocks is None else dst_blocks[r]


def compact_rows_reference(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    block_rows: list[int],
    keep_masks: torch.Tensor,
    kept_blocks: list[int],
    dst_blocks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``compact_ranges_reference`` for ``R`` requests of one layer.

    Request ``r``: blocks ``block_table[block_rows[r]]``, mask ``keep_masks[r]``
    (``[H, Lmax]``, False past its prompt), ``kept_blocks[r]`` reserved blocks,
    destinations ``dst_blocks[r]`` (``dst_blocks``: ``[R, W]`` integer, ``W`` at least
    every ``kept_blocks[r]``; None: in place, each request's own row).
    Returns (page_start, counts), both int32 ``[R, H]``.
    """
    _check_dst_table(dst_blocks, len(block_rows))
    results = [compact_ranges_reference(key_cache, value_cache, block_table[b], keep_masks[r],
                                        kept_blocks[r], _dst_row(dst_blocks, r))
               for r, b in enumerate(block_rows)]
    return (torch.stack([p for p, _ in results]), torch.stack([c for _, c in results]))


def _check_dst_table(dst_blocks: torch.Tensor | None, rows: int) -> None:
    if dst_blocks is not None and (dst_blocks.dim() != 2 or dst_blocks.shape[0] != rows):
        raise RuntimeError(f"dst_blocks must be [R={rows}, W], got {tuple(dst_blocks.shape)}")


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
    dst_blocks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Compact one request's kept tokens of all ``K`` layers of a group into head-pages
    pooled across the layers' tensors.

    key_cache/value_cache: logical ``[NB, H, bs, D]`` views over every layer's blocks (layer
    k's block b is ``layer_bases[k] + b``). block_ids: the request's block table row (the
    sources). keep_masks: ``[K, H, L]``. dst_blocks: 1-D integer tensor of destination
    block ids, none of them a source block; None: ``block_ids`` (in place). kept_blocks:
    the request keeps ``m`` blocks, ``dst[0:m]``, in every layer tensor; None: the fewest
    that hold the kept pages, ``m = max(1, cdiv(sum pages, K * H))``; ``dst_blocks`` must
    hold at least ``m`` ids. The pooled sequence has ``K`` chunks of ``C = m * H``
    entries; chunk k is the tensor of layer ``order[k]`` (``pooled_layer_order``), entry
    e of a chunk block ``layer_bases[order[k]] + dst[e // H]``, slot ``e % H``. Layer
    ``order[i]`` owns the entries after those of ``order[:i]``, heads in order, so each
    head's pages are consecutive entries.

    Why in place is safe: the ``i`` smallest page counts sum to at most ``i * C``, so the
    layer placed i-th writes only to chunks ``<= i``, i.e. to its own tensor (gathered
    before writing) or to tensors of layers already compacted. Destinations apart from
    the sources need no such argument.

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
    dst = _destinations(block_ids, dst_blocks, kept_blocks)
    capacity = kept_blocks * heads
    order = pooled_layer_order(layer_pages)
    blocks = block_ids.long()
    key_cache, value_cache = as_bytes(key_cache), as_bytes(value_cache)
    layer_start = torch.zeros(num_layers, dtype=torch.long, device=counts.device)
    layer_start[order] = torch.cumsum(layer_pages[order], 0) - layer_pages[order]
    page_start = layer_start[:, None] + torch.cumsum(pages, 1) - pages  # [K, H]
    for k in order.tolist():
        head_idx, pos = keep_masks[k].nonzero(as_tuple=True)
        src_block = layer_bases[k].long() + blocks[pos // block_size]
        # Gather first (a copy): in place, this layer's sources and destinations may
        # overlap.
        k_sel = key_cache[src_block, head_idx, pos % block_size]
        v_sel = value_cache[src_block, head_idx, pos % block_size]
        start = torch.cumsum(counts[k], 0) - counts[k]
        rank = torch.arange(pos.numel(), device=pos.device) - start[head_idx]
        entry = page_start[k, head_idx] + rank // block_size
        chunk, local = entry // capacity, entry % capacity
        dst_block = layer_bases.long()[order[chunk]] + dst[local // heads]
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
    dst_blocks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``compact_pooled_reference`` for ``R`` requests: keep_masks ``[R, K, H, Lmax]``
    (False past each prompt); dst_blocks ``[R, W]`` integer, row r the destinations of
    request r (None: in place, each request's own row). Returns (page_start ``[R, K, H]``,
    counts ``[R, K, H]``, chunk_layer ``[R, K]``, kept_blocks ``[R]``), all int32."""
    _check_dst_table(dst_blocks, len(block_rows))
    results = [compact_pooled_reference(key_cache, value_cache, block_table[b], keep_masks[r],
                                        layer_bases, kept_blocks[r], _dst_row(dst_blocks, r))
               for r, b in enumerate(block_rows)]
    return (torch.stack([r[0] for r in results]), torch.stack([r[1] for r in results]),
            torch.stack([r[2] for r in results]),
            torch.tensor([r[3] for r in results], dtype=torch.int32))


def check_decode_event(
    page_start: torch.Tensor,
    kept_counts: torch.Tensor,
    block_table: torch.Tensor,
    rows: torch.Tensor,
    keep_mask: torch.Tensor,
    window: int,
    kept_blocks: list[int],
    chunk_base: torch.Tensor | None = None,
) -> None:
    """The shape checks of a decode event's compaction (host metadata only; no sync).
    Raises ValueError."""
    if chunk_base is not None:
        raise ValueError("decode-event compaction supports the single-layer layout only; "
                         "head-pages pooled over layers (chunk_base) are not supported")
    if rows.dim() != 2 or rows.shape[1] != 7:
        raise ValueError(f"rows must be a decode.row_table [R, 7], got {tuple(rows.shape)}")
    num_rows = rows.shape[0]
    if keep_mask.dim() != 3 or keep_mask.shape[0] != num_rows or keep_mask.dtype != torch.bool:
        raise ValueError(f"keep_mask must be bool [R={num_rows}, H, width], got "
                         f"{keep_mask.dtype} {tuple(keep_mask.shape)}")
    if page_start.dim() != 2 or page_start.shape != kept_counts.shape \
            or page_start.shape[1] != keep_mask.shape[1]:
        raise ValueError(f"page_start/kept_counts must be [slots, H={keep_mask.shape[1]}], "
                         f"got {tuple(page_start.shape)} and {tuple(kept_counts.shape)}")
    if len(kept_blocks) != num_rows or any(p < 0 for p in kept_blocks):
        raise ValueError(f"kept_blocks must give P >= 0 for each of {num_rows} rows, got "
                         f"{list(kept_blocks)}")
    if num_rows and max(kept_blocks) > block_table.shape[1]:
        raise ValueError(f"P = {max(kept_blocks)} blocks exceeds the block table's "
                         f"{block_table.shape[1]} entries")
    if window < 1:
        raise ValueError(f"window must be positive, got {window}")


def compact_decode_event_reference(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    page_start: torch.Tensor,
    kept_counts: torch.Tensor,
    block_table: torch.Tensor,
    rows: torch.Tensor,
    keep_mask: torch.Tensor,
    window: int,
    kept_blocks: list[int],
    *,
    chunk_base: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compact one decode event's kept candidates of one layer into head-pages, in place.

    key_cache/value_cache: the layer's logical ``[nb, H, bs, D]`` views (any dtype, fp8
    moved as bytes). page_start/kept_counts: ``[slots, H]``, the current head-page ranges
    by slot (as the head-wise decode reads them, single-layer layout: entry i of a
    request's head-page sequence is block ``block_table[b, i // H]``, slot ``i % H``).
    rows: ``decode.row_table`` rows (batch row ``b``, slot, tail start and ``S`` are
    read). keep_mask: bool ``[R, H, width]`` over each head's candidates in the order
    the scoring uses: its ``kept_counts`` head-page tokens, then the tail positions
    ``[tail_start, S - w)``; the window ``[S - w, S)`` is always kept and stays in the
    tail. kept_blocks: ``P`` per row; the new head-pages go to block-table entries
    ``[0, P)``, heads in order, as the prompt compaction lays them out.

    Every kept candidate is gathered first (the new pages overwrite old head-pages and
    tail blocks), then written in candidate (= position) order. Returns (page_start,
    counts) int32 ``[R, H]`` (per row, to be stored at the rows' slots) and the new
    ``tail_start = S - w`` int32 ``[R]``. Raises ValueError on bad input: a mask bit set
    past a head's candidates or a mask narrower than them, more pages than ``P * H``,
    ``P`` blocks reaching the window's blocks (``P > (S - w) // bs``), a tail that does
    not hold the window, or a pooled layout (``chunk_base``: not supported).
    """
    check_decode_event(page_start, kept_counts, block_table, rows, keep_mask, window,
                       kept_blocks, chunk_base)
    num_rows, heads, width = keep_mask.shape
    block_size = key_cache.shape[2]
    dev = key_cache.device
    kc, vc = as_bytes(key_cache), as_bytes(value_cache)
    out_start = torch.zeros(num_rows, heads, dtype=torch.int32, device=dev)
    out_counts = torch.zeros_like(out_start)
    tails = torch.zeros(num_rows, dtype=torch.int32, device=dev)
    for r, (b, s, _, _, tail_start, seq_len, _) in enumerate(rows.tolist()):
        if seq_len < window or not 0 <= tail_start <= seq_len - window:
            raise ValueError(f"row {r}: the tail [{tail_start}, {seq_len}) must hold the "
                             f"window of {window} tokens")
        limit = kept_blocks[r]
        if limit > (seq_len - window) // block_size:
            raise ValueError(f"row {r}: P = {limit} blocks would overwrite the window "
                             f"[{seq_len - window}, {seq_len}) (block size {block_size})")
        block_row = block_table[b].to(dev).long()
        old_start = page_start[s].to(dev).long()
        old_counts = kept_counts[s].to(dev).long()
        n_tail = seq_len - window - tail_start
        mask = keep_mask[r].to(dev)
        cand = torch.arange(width, device=dev)
        if bool((mask & (cand[None, :] >= (old_counts + n_tail)[:, None])).any()):
            raise ValueError(f"row {r}: the keep mask selects past a head's candidates")
        if int((old_counts + n_tail).max()) > width:
            raise ValueError(f"row {r}: the keep mask is narrower than a head's "
                             f"{int((old_counts + n_tail).max())} candidates")
        counts = mask.sum(1)
        pages = (counts + block_size - 1) // block_size
        if int(pages.sum()) > limit * heads:
            raise ValueError(f"row {r}: {int(pages.sum())} head-pages do not fit in P = "
                             f"{limit} blocks ({limit * heads} pages)")
        head, c = mask.nonzero(as_tuple=True)  # by head, then candidate order
        paged = c < old_counts[head]
        entry = torch.where(paged, old_start[head] + c // block_size, 0)
        pos = torch.where(paged, tail_start, tail_start + c - old_counts[head])
        src_block = block_row[torch.where(paged, entry // heads, pos // block_size)]
        src_slot = torch.where(paged, entry % heads, head)
        src_off = torch.where(paged, c % block_size, pos % block_size)
        # Gather first (a copy): the new pages overwrite old head-pages and tail blocks.
        k_sel = kc[src_block, src_slot, src_off]
        v_sel = vc[src_block, src_slot, src_off]
        first = torch.cumsum(pages, 0) - pages
        rank = torch.arange(c.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[head]
        seq = first[head] + rank // block_size
        dst_block, dst_slot, dst_off = block_row[seq // heads], seq % heads, rank % block_size
        kc[dst_block, dst_slot, dst_off] = k_sel
        vc[dst_block, dst_slot, dst_off] = v_sel
        out_start[r], out_counts[r], tails[r] = first.to(torch.int32), counts.to(torch.int32), \
            seq_len - window
    return out_start, out_counts, tails
