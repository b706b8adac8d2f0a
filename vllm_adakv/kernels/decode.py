"""Per-head paged attention for compressed requests: the torch reference.

One contract for both backends, that of ``triton_decode.headwise_attention_ranges_triton``
(the CUDA backend's kernel): ``headwise_attention_ranges_reference`` is what the CPU
backend runs. Head h of the request in slot s owns the ``ceil(kept_counts[s, h] / bs)``
head-pages that start at entry ``page_start[s, h]`` of the request's head-page sequence
(``pooled_page_table`` says where each entry lies). For a row and KV head the keys are the
kept tokens of those pages (all older than the prompt end), followed by the tail:
positions ``[tail_start, seq_len)`` in the normal layout through the row's block table
row. A query at position p sees every kept token and the tail up to p; a row's query
tokens are the last ``q_end - q_start`` positions before ``seq_len``.

Inside, the ranges become explicit page tables and the rows are attended in batches of
equal query length (``_attend_tables``).

fp8 caches are read as ``value * k_scale`` / ``value * v_scale`` (``kernels.fp8``).
Attention is computed in fp32 (float64 for float64 queries) and stored in the output's
dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vllm_adakv.kernels.fp8 import check_readable, dequantize, index, is_fp8

# Columns of the per-row table ``rows`` (int32 [R, ROW_COLUMNS]), see ``row_table``.
ROW_COLUMNS = 7
_MAX_PAGES = 1024  # head-pages gathered at once (bounds the scratch buffer)
_SCRATCH: dict[str, torch.Tensor] = {}


class _Pages(NamedTuple):
    """The head-pages some rows read, one entry per (row, head, page)."""

    block: torch.Tensor  # cache block
    slot: torch.Tensor  # cache slot (KV head) within the block
    seg: torch.Tensor  # softmax segment: row * H + head
    first: torch.Tensor  # position of the page's slot 0 (kept: index in the kept sequence)
    lower: torch.Tensor  # lowest visible position
    upper: torch.Tensor  # highest visible position (kept pages; tail pages: the query's)
    is_tail: torch.Tensor


def _tail_blocks(tail_start: torch.Tensor, seq_lens: torch.Tensor, block_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the first tail block and how many blocks hold ``[tail_start, seq_len)``."""
    first_block = tail_start.long() // block_size
    num_tail = ((seq_lens.long() - 1) // block_size - first_block + 1).clamp(min=0)
    return first_block, num_tail


def _pages(page_table: torch.Tensor, kept_counts: torch.Tensor, block_table: torch.Tensor,
           tail_start: torch.Tensor, seq_lens: torch.Tensor, block_size: int) -> _Pages:
    """Kept pages (``page_table >= 0``), then every head's page of each tail block."""
    heads = page_table.shape[1]
    dev = page_table.device
    r, h, p = (page_table >= 0).nonzero(as_tuple=True)
    virt = page_table[r, h, p].long()
    first_block, num_tail = _tail_blocks(tail_start, seq_lens, block_size)
    j = torch.arange(int(num_tail.max()) if num_tail.numel() else 0, device=dev)
    tr, tj = (j[None, :] < num_tail[:, None]).nonzero(as_tuple=True)
    tblk = (first_block[tr] + tj).repeat_interleave(heads)
    tr = tr.repeat_interleave(heads)
    th = torch.arange(heads, device=dev).repeat(len(tj))
    return _Pages(
        block=torch.cat([virt // heads, block_table.long()[tr, tblk]]),
        slot=torch.cat([virt % heads, th]),
        seg=torch.cat([r * heads + h, tr * heads + th]),
        first=torch.cat([p * block_size, tblk * block_size]),
        lower=torch.cat([torch.zeros_like(p), tail_start.long()[tr]]),
        upper=torch.cat([kept_counts.long()[r, h] - 1, torch.zeros_like(tr)]),
        is_tail=torch.cat([torch.zeros_like(p, dtype=torch.bool),
                           torch.ones_like(tr, dtype=torch.bool)]),
    )


def _scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer reused across calls: a fresh large CPU tensor costs a page fault per
    memory page, more than the gather that fills it."""
    buf = _SCRATCH.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
        buf = _SCRATCH[name] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def _packed_pages(key_cache: torch.Tensor, value_cache: torch.Tensor) -> torch.Tensor | None:
    """The caches as ``[nb * H, 2 * bs * D]`` when each head-page is its keys (stored
    ``[D, bs]``) then its values (vLLM's CPU layout, see ``logical_kv_views``), else None."""
    nb, heads, bs, dim = key_cache.shape
    s0, s1 = key_cache.stride(0), key_cache.stride(1)
    page = bs * dim
    if (key_cache.stride()[2:] != (1, bs) or value_cache.stride() != (s0, s1, dim, 1)
            or s0 != heads * s1 or s1 != 2 * page or value_cache.dtype != key_cache.dtype
            or value_cache.data_ptr() != key_cache.data_ptr() + page * key_cache.element_size()):
        return None
    return torch.as_strided(key_cache, (nb * heads, 2 * page), (s1, 1), key_cache.storage_offset())


def _gather_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, block: torch.Tensor,
               slot: torch.Tensor, dtype: torch.dtype = torch.float32,
               k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``[M, D, bs]`` and values ``[M, bs, D]`` of the given head-pages in ``dtype``,
    fp8 caches dequantized (views of a scratch buffer in vLLM's CPU layout: valid until
    the next call)."""
    m, (_, heads, bs, dim) = len(block), key_cache.shape
    check_readable(key_cache.dtype)
    packed = _packed_pages(key_cache, value_cache)
    if packed is None:
        return (dequantize(index(key_cache, (block, slot)), k_scale, dtype).transpose(1, 2),
                dequantize(index(value_cache, (block, slot)), v_scale, dtype))
    page = bs * dim
    pages = _scratch("pages", m * 2 * page, packed.dtype, packed.device).view(m, 2 * page)
    torch.index_select(packed, 0, block * heads + slot, out=pages)
    if pages.dtype != dtype:
        work = _scratch("pages_work", pages.numel(), dtype, pages.device)
        pages = work.view(m, 2 * page).copy_(pages)
    keys, values = pages[:, :page].view(m, dim, bs), pages[:, page:].view(m, bs, dim)
    if is_fp8(packed.dtype):
        for part, scale in ((keys, k_scale), (values, v_scale)):
            if scale is not None:
                part.mul_(scale.to(dtype).reshape(()))
    return keys, values


def _chunks(rows: list[int], sizes: list[int], limit: int) -> list[list[int]]:
    """``rows`` in order, split so that each part reads at most ``limit`` pages (or is
    one row)."""
    parts: list[list[int]] = []
    total = limit + 1
    for r in rows:
        if total + sizes[r] > limit:
            parts.append([])
            total = 0
        parts[-1].append(r)
        total += sizes[r]
    return parts


def _work_dtype(query: torch.Tensor) -> torch.dtype:
    """float64 for float64 queries, float32 otherwise."""
    return torch.float64 if query.dtype == torch.float64 else torch.float32


def _attend_rows(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 pages: _Pages, q_start: torch.Tensor, seq_lens: torch.Tensor, q_len: int,
                 scale: float, out: torch.Tensor, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> None:
    """Rows of ``q_len`` query tokens each: logits page by page, then one softmax per
    (row, head, query) over all its pages (kept + tail)."""
    rows, heads, block_size = len(q_start), key_cache.shape[1], key_cache.shape[2]
    num_q_heads, dim = query.shape[1], query.shape[2]
    group = num_q_heads // heads
    dev = query.device
    work = _work_dtype(query)
    t = torch.arange(q_len, device=dev)
    tokens = (q_start.long()[:, None] + t[None, :]).flatten()  # [R * q]
    q = query[tokens].to(work).view(rows, q_len, heads, group, dim)
    q = q.permute(0, 2, 3, 1, 4).reshape(rows * heads, group * q_len, dim)
    keys, values = _gather_kv(key_cache, value_cache, pages.block, pages.slot, work, k_scale,
                              v_scale)
    logits = torch.bmm(q[pages.seg], keys)
    logits.mul_(scale)  # [M, G * q, bs]
    q_pos = seq_lens.long()[pages.seg // heads, None] - q_len + t[None, :]  # [M, q]
    upper = torch.where(pages.is_tail[:, None], q_pos, pages.upper[:, None])
    pos = pages.first[:, None] + torch.arange(block_size, device=dev)[None, :]  # [M, bs]
    hidden = (pos[:, None, :] < pages.lower[:, None, None]) | (pos[:, None, :] > upper[..., None])
    logits.view(-1, group, q_len, block_size).masked_fill_(hidden[:, None], float("-inf"))
    peak = torch.full((rows * heads, group * q_len), float("-inf"), dtype=work, device=dev)
    peak.scatter_reduce_(0, pages.seg[:, None].expand(-1, group * q_len), logits.amax(-1),
                         "amax")
    weights = torch.exp(logits - peak[pages.seg][..., None])
    denom = torch.zeros_like(peak).index_add_(0, pages.seg, weights.sum(-1))
    o = torch.zeros(rows * heads, group * q_len, dim, dtype=work, device=dev)
    o.index_add_(0, pages.seg, torch.bmm(weights, values)).div_(denom[..., None])
    o = o.view(rows, heads, group, q_len, dim).permute(0, 3, 1, 2, 4)
    out[tokens] = o.reshape(rows * q_len, num_q_heads, dim).to(out.dtype)


def _attend_tables(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    page_table: torch.Tensor,
    kept_counts: torch.Tensor,
    block_table: torch.Tensor,
    tail_start: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over kept head-pages plus the tail, written into ``out``, with each
    row's pages listed explicitly.

    query/out: ``[T, Hq, D]``; key_cache/value_cache: logical ``[nb, H, bs, D]`` (fp8:
    dequantized with ``k_scale`` / ``v_scale``); page_table: ``[R, H, P]`` int32 virtual
    page ids (block * H + slot, -1 pad); kept_counts: ``[R, H]``; block_table: ``[R, NB]``
    (tail blocks); tail_start, seq_lens: ``[R]``; query_start_loc: ``[R + 1]`` (row r's
    queries are ``query[qsl[r]:qsl[r + 1]]``). Computes in fp32 (float64 for float64
    queries), stores in ``out.dtype``.
    """
    # Tables may come on another device than the caches (e.g. CPU row tensors beside CUDA
    # caches): index everything on the caches' device.
    dev = key_cache.device
    page_table, kept_counts, block_table, tail_start, seq_lens, query_start_loc = (
        t.to(dev) for t in (page_table, kept_counts, block_table, tail_start, seq_lens,
                            query_start_loc))
    qsl = query_start_loc.tolist()
    by_len: dict[int, list[int]] = {}
    for r in range(page_table.shape[0]):
        if qsl[r + 1] > qsl[r]:
            by_len.setdefault(qsl[r + 1] - qsl[r], []).append(r)
    block_size = key_cache.shape[2]
    _, num_tail = _tail_blocks(tail_start, seq_lens, block_size)
    sizes = (page_table >= 0).sum((1, 2)) + num_tail * page_table.shape[1]
    for q_len, rows in by_len.items():
        for part in _chunks(rows, sizes.tolist(), _MAX_PAGES):
            sel = torch.tensor(part, device=page_table.device)
            pages = _pages(page_table[sel], kept_counts[sel], block_table[sel],
                           tail_start[sel], seq_lens[sel], block_size)
            _attend_rows(query, key_cache, value_cache, pages, query_start_loc[sel],
                         seq_lens[sel], q_len, scale, out, k_scale, v_scale)
    return out


def pooled_page_table(
    page_start: torch.Tensor,
    kept_counts: torch.Tensor,
    block_row: torch.Tensor,
    num_kv_heads: int,
    block_size: int,
    chunk_base: torch.Tensor | None = None,
    capacity: int | None = None,
) -> torch.Tensor:
    """Virtual page ids ``[H, P]`` (block * H + slot, -1 padded) of one (request, layer).

    Head h owns the ``ceil(kept_counts[h] / bs)`` entries of the request's pooled head-page
    sequence from ``page_start[h]``. Entry g lies in chunk ``g // capacity`` (one chunk per
    layer tensor, ``capacity = kept_blocks * H`` entries each), at block
    ``chunk_base[chunk] + block_row[(g % capacity) // H]``, slot ``g % H``, where
    ``chunk_base`` holds the block offset of the chunk's layer in the view over all layers.
    Without ``chunk_base`` the sequence is one chunk at offset 0 (a single layer's cache).
    """
    counts = kept_counts.long()
    pages = (counts + block_size - 1) // block_size
    width = max(int(pages.max().item()) if pages.numel() else 0, 1)
    j = torch.arange(width, device=counts.device)
    idx = page_start.long()[:, None] + j[None, :]
    valid = j[None, :] < pages[:, None]
    idx = torch.where(valid, idx, torch.zeros_like(idx))
    if chunk_base is None:
        base = torch.zeros_like(idx)
        local = idx
    else:
        assert capacity is not None and capacity > 0
        base = chunk_base.long()[idx // capacity]
        local = idx % capacity
    virt = (base + block_row.long()[local // num_kv_heads]) * num_kv_heads + local % num_kv_heads
    return torch.where(valid, virt, torch.full_like(virt, -1)).to(torch.int32)


def row_table(batch_rows: torch.Tensor, slots: torch.Tensor, q_start: torch.Tensor,
              q_end: torch.Tensor, tail_start: torch.Tensor, seq_lens: torch.Tensor
              ) -> torch.Tensor:
    """Per-row int32 table ``[R, 7]`` the kernels read, from ``[R]`` tensors:
    batch row (block table row), slot (row of the page/count tables), query token
    range ``[q_start, q_end)``, tail start, sequence length, and the row's first
    index in the split-K scratch (its queries, counted from row 0)."""
    q_len = (q_end - q_start).to(torch.int64)
    mid_start = torch.cumsum(q_len, 0) - q_len
    cols = (batch_rows, slots, q_start, q_end, tail_start, seq_lens, mid_start)
    return torch.stack([c.to(device=batch_rows.device, dtype=torch.int32) for c in cols], 1)


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
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-wise attention for selected batch rows, pages given as ranges (module doc).

    query/out: ``[T, Hq, D]``; key_cache/value_cache: logical ``[nb, H, bs, D]``;
    page_start/kept_counts: ``[S, H]`` by slot; block_table: ``[B, NB]`` of the whole
    batch; rows: int32 ``[R, 7]`` from ``row_table`` (batch row, slot,
    q_start, q_end, tail_start, seq_len, scratch offset). Single layer (``chunk_base``
    None): entry i is block ``block_table[b, i // H]``, slot ``i % H``. Pooled over
    layers: the caches view every layer's blocks, ``chunk_base`` ``[S, K]`` and
    ``capacity`` ``[S]`` place the entries as ``pooled_page_table`` says, and the tail
    blocks are ``layer_base + block_table[b, pos // bs]``. ``num_row_tokens`` sizes the
    Triton version's scratch and is unused here. ``k_scale``/``v_scale``: an fp8 cache's
    dequantization scales (``kernels.fp8``; None: 1). Only the rows' query tokens of
    ``out`` are written.
    """
    del num_row_tokens
    table = rows.tolist()
    if not table:
        return out
    heads, block_size = key_cache.shape[1], key_cache.shape[2]
    page_tables, token_idx, starts = [], [], [0]
    for b, s, q0, q1, _, _, _ in table:
        page_tables.append(pooled_page_table(
            page_start[s], kept_counts[s], block_table[b], heads, block_size,
            None if chunk_base is None else chunk_base[s],
            None if capacity is None else int(capacity[s])))
        token_idx.append(torch.arange(q0, q1))
        starts.append(starts[-1] + q1 - q0)
    width = max(t.shape[1] for t in page_tables)
    padded = torch.full((len(table), heads, width), -1, dtype=torch.int32)
    for i, t in enumerate(page_tables):
        padded[i, :, : t.shape[1]] = t
    cols = torch.tensor(table, dtype=torch.int64)
    idx = torch.cat(token_idx).to(query.device)
    part = out.new_empty((len(idx), *query.shape[1:]))  # rounded once, to out's dtype
    counts = kept_counts[cols[:, 1].to(kept_counts.device)]
    _attend_tables(query[idx], key_cache, value_cache, padded, counts,
                   block_table[cols[:, 0].to(block_table.device)].long() + layer_base,
                   cols[:, 4], cols[:, 5], torch.tensor(starts), scale, part, k_scale, v_scale)
    out[idx] = part
    return out


def masked_prompt_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_row: torch.Tensor,
    keep_mask: torch.Tensor,
    seq_len: int,
    scale: float,
    out: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one request's queries over its kept prompt tokens, before compaction.

    query/out: ``[T, Hq, D]``, the positions ``[seq_len - T, seq_len)``, all past the
    prompt; key_cache/value_cache: the layer's logical ``[nb, H, bs, D]`` views in the
    normal layout through ``block_row`` (fp8: dequantized with ``k_scale`` / ``v_scale``,
    None: 1); keep_mask: ``[H, L]`` over the prompt. Head h sees the prompt positions it
    keeps, then ``[L, p]`` for a query at position p. Computes in fp32 (float64 for
    float64 queries; the rare path of a resumed request whose chunk runs past its prompt
    while its pages are pooled, i.e. compacted only at the group's last layer).
    """
    heads, prompt_len = keep_mask.shape
    block_size = key_cache.shape[2]
    q_len, num_q_heads, dim = query.shape
    group = num_q_heads // heads
    work = _work_dtype(query)
    blocks = block_row.long()
    q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
    tail_pos = torch.arange(prompt_len, seq_len, device=query.device)
    for h in range(heads):
        pos = torch.cat([keep_mask[h].nonzero().flatten(), tail_pos])
        where = (blocks[pos // block_size], h, pos % block_size)
        keys = dequantize(index(key_cache, where), k_scale, work)
        values = dequantize(index(value_cache, where), v_scale, work)
        q = query[:, h * group : (h + 1) * group].to(work)  # [T, G, D]
        logits = torch.einsum("tgd,nd->tgn", q, keys) * scale
        visible = (pos[None, :] < prompt_len) | (pos[None, :] <= q_pos[:, None])  # [T, N]
        logits = logits.masked_fill(~visible[:, None], float("-inf"))
        o = torch.einsum("tgn,nd->tgd", torch.softmax(logits, -1), values)
        out[:, h * group : (h + 1) * group] = o.to(out.dtype)
    return out
