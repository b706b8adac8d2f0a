"""Per-head paged attention for compressed requests.

Torch reference. For request r and KV head h the keys are the ``kept_counts[r, h]``
tokens in the head-pages ``page_table[r, h]`` (all older than the prompt end),
followed by the tail: positions [tail_start[r], seq_lens[r]) in the normal
layout through ``block_table[r]``. A query at position p sees the kept tokens
and the tail up to p. Query tokens of row r are the last
``query_start_loc[r+1] - query_start_loc[r]`` positions before ``seq_lens[r]``.
"""

from __future__ import annotations

import torch


def _row_keys_values(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    pages: torch.Tensor,
    counts: torch.Tensor,
    block_row: torch.Tensor,
    tail_start: int,
    seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    heads, block_size = key_cache.shape[1], key_cache.shape[2]
    max_pages = pages.shape[1]
    safe = pages.clamp(min=0).long()
    k_kept = key_cache[safe // heads, safe % heads]  # [H, P, bs, D]
    v_kept = value_cache[safe // heads, safe % heads]
    dim = k_kept.shape[-1]
    k_kept = k_kept.reshape(heads, max_pages * block_size, dim)
    v_kept = v_kept.reshape(heads, max_pages * block_size, dim)
    kept_valid = torch.arange(max_pages * block_size, device=pages.device)[None, :] < counts[
        :, None
    ].long()
    tail_pos = torch.arange(tail_start, seq_len, device=pages.device)
    tail_blocks = block_row.long()[tail_pos // block_size]
    k_tail = key_cache[tail_blocks, :, tail_pos % block_size].transpose(0, 1)  # [H, T, D]
    v_tail = value_cache[tail_blocks, :, tail_pos % block_size].transpose(0, 1)
    keys = torch.cat([k_kept, k_tail], dim=1)
    values = torch.cat([v_kept, v_tail], dim=1)
    return keys, values, kept_valid, tail_pos


def headwise_attention_reference(
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
) -> torch.Tensor:
    """Attention over kept head-pages plus the shared tail, written into ``out``.

    query/out: ``[T, Hq, D]``; key_cache/value_cache: logical ``[nb, H, bs, D]``;
    page_table: ``[R, H, P]`` int32 virtual page ids (block * H + slot, -1 pad);
    kept_counts: ``[R, H]``; block_table: ``[R, NB]``; tail_start, seq_lens: ``[R]``;
    query_start_loc: ``[R + 1]``. Computes in fp32, stores in ``out.dtype``.
    """
    heads = key_cache.shape[1]
    num_q_heads, dim = query.shape[1], query.shape[2]
    group = num_q_heads // heads
    qsl = query_start_loc.tolist()
    for r in range(page_table.shape[0]):
        q_start, q_end = qsl[r], qsl[r + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        seq_len = int(seq_lens[r])
        keys, values, kept_valid, tail_pos = _row_keys_values(
            key_cache, value_cache, page_table[r], kept_counts[r], block_table[r],
            int(tail_start[r]), seq_len,
        )
        q = query[q_start:q_end].float().reshape(q_len, heads, group, dim).permute(1, 2, 0, 3)
        logits = torch.einsum("hgqd,hnd->hgqn", q, keys.float()) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
        tail_valid = tail_pos[None, :] <= q_pos[:, None]  # [q, T]
        valid = torch.cat(
            [
                kept_valid[:, None, :].expand(heads, q_len, -1),
                tail_valid[None].expand(heads, -1, -1),
            ],
            dim=-1,
        )  # [H, q, N]
        logits = logits.masked_fill(~valid[:, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        o = torch.einsum("hgqn,hnd->hgqd", probs, values.float())  # [H, G, q, D]
        out[q_start:q_end] = o.permute(2, 0, 1, 3).reshape(q_len, num_q_heads, dim).to(out.dtype)
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
    tail_start, seq_len, scratch offset; see ``triton_decode.row_table``).
    Single layer (``chunk_base`` None): entry i = block ``block_table[b, i // H]``, slot
    ``i % H`` of ``key_cache``. Pooled over layers: ``key_cache``/``value_cache`` view all
    layers' blocks (layer tensors at block offsets), ``chunk_base`` ``[S, K]`` and
    ``capacity`` ``[S]`` place entry g as in ``pooled_page_table``, and this layer's tail
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


def masked_prompt_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_row: torch.Tensor,
    keep_mask: torch.Tensor,
    seq_len: int,
    scale: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Attention of one request's queries over its kept prompt tokens, before compaction.

    query/out: ``[T, Hq, D]``, the positions ``[seq_len - T, seq_len)``, all past the
    prompt; key_cache/value_cache: the layer's logical ``[nb, H, bs, D]`` views in the
    normal layout through ``block_row``; keep_mask: ``[H, L]`` over the prompt. Head h sees
    the prompt positions it keeps, then ``[L, p]`` for a query at position p. Computes in
    fp32 (the rare path of a resumed request whose chunk runs past its prompt while its
    pages are pooled, i.e. compacted only at the group's last layer).
    """
    heads, prompt_len = keep_mask.shape
    block_size = key_cache.shape[2]
    q_len, num_q_heads, dim = query.shape
    group = num_q_heads // heads
    blocks = block_row.long()
    q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
    tail_pos = torch.arange(prompt_len, seq_len, device=query.device)
    for h in range(heads):
        pos = torch.cat([keep_mask[h].nonzero().flatten(), tail_pos])
        keys = key_cache[blocks[pos // block_size], h, pos % block_size].float()
        values = value_cache[blocks[pos // block_size], h, pos % block_size].float()
        q = query[:, h * group : (h + 1) * group].float()  # [T, G, D]
        logits = torch.einsum("tgd,nd->tgn", q, keys) * scale
        visible = (pos[None, :] < prompt_len) | (pos[None, :] <= q_pos[:, None])  # [T, N]
        logits = logits.masked_fill(~visible[:, None], float("-inf"))
        o = torch.einsum("tgn,nd->tgd", torch.softmax(logits, -1), values)
        out[:, h * group : (h + 1) * group] = o.to(out.dtype)
    return out
