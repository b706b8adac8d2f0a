"""Scoring at the end of prefill (and at a decode-time event, issue 29): how much the
observation window attends each key.

Torch reference. Shapes follow vLLM: query heads are grouped by KV head
(query head i reads KV head i // G). Caches are logical
``[num_blocks, H, block_size, D]`` views, whatever their physical packing; an fp8 key
cache is read as ``value * k_scale`` (``kernels.fp8``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_adakv.kernels.decode import pooled_page_table
from vllm_adakv.kernels.fp8 import dequantize, index
from vllm_adakv.tensors import on_device


def gather_prompt_keys(
    key_cache: torch.Tensor, block_ids: torch.Tensor, prompt_len: int
) -> torch.Tensor:
    """Keys of positions [0, prompt_len) of one request as ``[H, prompt_len, D]``."""
    block_size = key_cache.shape[2]
    num_blocks = -(-prompt_len // block_size)
    blocks = index(key_cache, block_ids[:num_blocks].long())  # [nb, H, bs, D]
    heads, dim = blocks.shape[1], blocks.shape[3]
    return blocks.permute(1, 0, 2, 3).reshape(heads, num_blocks * block_size, dim)[:, :prompt_len]


def pool_scores(scores: torch.Tensor, pooling: str, kernel: int) -> torch.Tensor:
    """1-D pooling along positions, stride 1, same length. ``scores``: [H, C]."""
    if kernel == 1:
        return scores
    x = scores.unsqueeze(1)
    pad = kernel // 2
    if pooling == "max":
        pooled = F.max_pool1d(x, kernel, stride=1, padding=pad)
    elif pooling == "avg":
        pooled = F.avg_pool1d(x, kernel, stride=1, padding=pad, count_include_pad=False)
    else:
        raise ValueError(f"unknown pooling {pooling!r}")
    return pooled.squeeze(1)


def pool_rows(scores: torch.Tensor, num_candidates: list[int], pooling: str,
              kernel: int) -> torch.Tensor:
    """``pool_scores`` of each row of ``[R, H, Cmax]`` over its first ``C_r`` positions;
    padding stays -inf. Max pooling runs on the whole batch (-inf padding pools exactly
    as the edge of a row does); average pooling row by row (its edge count excludes
    padding)."""
    rows, heads, width = scores.shape
    valid = torch.arange(width, device=scores.device) < on_device(
        num_candidates, torch.long, scores.device)[:, None, None]
    if kernel == 1:
        return torch.where(valid, scores, float("-inf"))
    if pooling == "max":
        pooled = pool_scores(torch.where(valid, scores, float("-inf")).view(-1, width),
                             pooling, kernel).view(rows, heads, width)
        return torch.where(valid, pooled, float("-inf"))
    out = torch.full_like(scores, float("-inf"))
    for r, c in enumerate(num_candidates):
        if c:  # avg_pool1d refuses an empty row
            out[r, :, :c] = pool_scores(scores[r, :, :c], pooling, kernel)
    return out


def pool_candidates(scores: torch.Tensor, num_candidates: torch.Tensor, pooling: str,
                    kernel: int) -> torch.Tensor:
    """``pool_rows`` with the counts ``[R, H]`` as a tensor (on ``scores``' device; no host
    sync): each (row, head) of ``scores`` ``[R, H, C]`` pooled over its first ``n`` entries,
    the rest -inf. Average pooling is a pooled sum over the valid entries divided by the
    pooled count of valid entries (the edges' count excludes padding, as ``pool_rows``)."""
    if pooling not in ("max", "avg"):
        raise ValueError(f"unknown pooling {pooling!r}")
    rows, heads, width = scores.shape
    valid = torch.arange(width, device=scores.device) < num_candidates.to(
        scores.device, torch.long)[..., None]
    if kernel == 1 or width == 0:
        return torch.where(valid, scores, float("-inf"))
    if pooling == "max":
        x = torch.where(valid, scores, float("-inf")).view(rows * heads, 1, width)
        pooled = F.max_pool1d(x, kernel, stride=1, padding=kernel // 2)
    else:
        both = torch.stack([torch.where(valid, scores, 0.0), valid.to(scores.dtype)], 2)
        sums = F.avg_pool1d(both.view(rows * heads, 2, width), kernel, stride=1,
                            padding=kernel // 2, count_include_pad=True)
        pooled = sums[:, 0] / sums[:, 1].clamp(min=0.5 / kernel)
    return torch.where(valid, pooled.view(rows, heads, width), float("-inf"))


def score_windows_reference(
    window_queries: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    block_rows: list[int],
    prompt_lens: list[int],
    scale: float,
    *,
    gqa_reduce: str,
    pooling: str,
    pool_kernel: int,
    k_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores of ``R`` requests of one layer: fp32 ``[R, H, Lmax - w]``, -inf padding.

    Request ``r``: window queries ``window_queries[r]`` (``[w, Hq, D]``), blocks
    ``block_table[block_rows[r]]``, prompt ``prompt_lens[r]``; its row holds
    ``score_window_reference(...)`` of that request in its first ``prompt_lens[r] - w``
    positions. ``k_scale``: the key cache's dequantization scale if it is fp8
    (``kernels.fp8``; None: 1).
    """
    rows, window = window_queries.shape[:2]
    heads = key_cache.shape[1]
    out = torch.full((rows, heads, max(prompt_lens) - window), float("-inf"),
                     dtype=torch.float32, device=window_queries.device)
    for r, (block_row, length) in enumerate(zip(block_rows, prompt_lens, strict=True)):
        out[r, :, : length - window] = score_window_reference(
            window_queries[r], key_cache, block_table[block_row], length, scale,
            gqa_reduce=gqa_reduce, pooling=pooling, pool_kernel=pool_kernel, k_scale=k_scale)
    return out


def score_window_reference(
    window_query: torch.Tensor,
    key_cache: torch.Tensor,
    block_ids: torch.Tensor,
    prompt_len: int,
    scale: float,
    *,
    gqa_reduce: str,
    pooling: str,
    pool_kernel: int,
    k_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """SnapKV scores of the candidates [0, prompt_len - w) for each KV head.

    window_query: ``[w, Hq, D]`` queries (after RoPE) of positions
        [prompt_len - w, prompt_len).
    k_scale: the key cache's dequantization scale if it is fp8 (None: 1).
    Returns fp32 ``[H, prompt_len - w]``: softmax over all prompt keys (causal
    inside the window), summed over the window queries, reduced over each GQA
    group (mean or max, never repeating KV heads), then pooled. Computed in fp32
    (float64 for float64 queries).
    """
    w, num_q_heads, dim = window_query.shape
    work = torch.float64 if window_query.dtype == torch.float64 else torch.float32
    keys = dequantize(gather_prompt_keys(key_cache, block_ids, prompt_len), k_scale,
                      work)  # [H, L, D]
    heads = keys.shape[0]
    group = num_q_heads // heads
    q = window_query.to(work).reshape(w, heads, group, dim).permute(1, 2, 0, 3)  # [H, G, w, D]
    logits = torch.einsum("hgwd,hld->hgwl", q, keys) * scale
    q_pos = torch.arange(prompt_len - w, prompt_len, device=keys.device)
    k_pos = torch.arange(prompt_len, device=keys.device)
    logits.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
    attn = torch.softmax(logits, dim=-1).sum(dim=2)  # [H, G, L]
    if gqa_reduce == "mean":
        reduced = attn.mean(dim=1)
    elif gqa_reduce == "max":
        reduced = attn.amax(dim=1)
    else:
        raise ValueError(f"unknown gqa_reduce {gqa_reduce!r}")
    return pool_scores(reduced[:, : prompt_len - w], pooling, pool_kernel).float()


def score_decode_windows_reference(
    window_queries: torch.Tensor,
    keys: torch.Tensor,
    num_candidates: torch.Tensor,
    window_keys: torch.Tensor,
    scale: float,
    *,
    gqa_reduce: str,
    pooling: str,
    pool_kernel: int,
) -> torch.Tensor:
    """Scores of one decode event's candidates (``methods.base.DecodeRows``): ``[R, H, Cmax]``,
    -inf padding; float64 for float64 queries, fp32 otherwise.

    window_queries: ``[R, w, Hq, D]`` queries of the row's last ``w`` positions (after RoPE);
    keys: ``[R, H, Cmax, D]`` each head's candidates in position order, the first
    ``num_candidates[r, h]`` real; window_keys: ``[R, H, w, D]``. Each window query's
    softmax runs over all it sees (its head's candidates and the window keys up to its
    own position), is summed over the window, reduced over each GQA group and pooled
    along the candidate sequence of its (row, head): neighbours in position order among
    the head's candidates, whatever the positions between them (evicted tokens are not
    padded back). Pooling edges are the ends of that sequence, as ``pool_rows``.
    """
    rows, window, num_q_heads, dim = window_queries.shape
    heads, width = keys.shape[1], keys.shape[2]
    group = num_q_heads // heads
    work = torch.float64 if window_queries.dtype == torch.float64 else torch.float32
    device = window_queries.device
    counts = num_candidates.to(device=device, dtype=torch.long)
    q = window_queries.to(work).reshape(rows, window, heads, group, dim).permute(0, 2, 3, 1, 4)
    cand = torch.einsum("rhgqd,rhcd->rhgqc", q, keys.to(device, work)) * scale
    valid = torch.arange(width, device=device) < counts[..., None]  # [R, H, C]
    cand = cand.masked_fill(~valid[:, :, None, None, :], float("-inf"))
    own = torch.einsum("rhgqd,rhkd->rhgqk", q, window_keys.to(device, work)) * scale
    order = torch.arange(window, device=device)
    own = own.masked_fill(order[None, :] > order[:, None], float("-inf"))  # causal
    attn = torch.softmax(torch.cat([cand, own], dim=-1), dim=-1)[..., :width].sum(dim=3)
    if gqa_reduce == "mean":
        reduced = attn.mean(dim=2)
    elif gqa_reduce == "max":
        reduced = attn.amax(dim=2)
    else:
        raise ValueError(f"unknown gqa_reduce {gqa_reduce!r}")
    if width == 0:
        return reduced
    pooled = pool_rows(reduced.reshape(rows * heads, 1, width), counts.flatten().tolist(),
                       pooling, pool_kernel)
    return pooled.view(rows, heads, width)


def gather_decode_candidates(
    key_cache: torch.Tensor,
    page_start: torch.Tensor,
    kept_counts: torch.Tensor,
    block_table: torch.Tensor,
    rows: torch.Tensor,
    window: int,
    width: int,
    *,
    chunk_base: torch.Tensor | None = None,
    capacity: torch.Tensor | None = None,
    layer_base: int = 0,
    k_scale: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode event's keys in ``DecodeRows``' dense form, read from the paged layout
    the head-wise decode reads (``decode.headwise_attention_ranges_reference``).

    ``rows``: ``decode.row_table`` rows (batch row, slot, tail start and sequence length
    ``S`` are read). Head ``h`` of row ``r`` (slot ``s``): its ``kept_counts[s, h]``
    head-page tokens (the pages from entry ``page_start[s, h]``, placed as
    ``pooled_page_table`` says; pooled over layers with ``chunk_base``/``capacity``),
    then the tail positions ``[tail_start, S - w)`` through the block-table row (plus
    ``layer_base``). Returns keys ``[R, H, width, D]`` (zero padding),
    ``num_candidates`` ``[R, H]`` (long) and the window keys ``[R, H, w, D]`` (positions
    ``[S - w, S)``), dequantized (fp8: ``k_scale``) to ``dtype``. Raises ValueError if a
    tail starts inside the window, a sequence is shorter than the window, or a head has
    more than ``width`` candidates.
    """
    _, heads, block_size, dim = key_cache.shape
    dev = key_cache.device
    table = rows.tolist()
    keys = torch.zeros(len(table), heads, width, dim, dtype=dtype, device=dev)
    wkeys = torch.zeros(len(table), heads, window, dim, dtype=dtype, device=dev)
    counts = torch.zeros(len(table), heads, dtype=torch.long, device=dev)
    for r, (b, s, _, _, tail_start, seq_len, _) in enumerate(table):
        if seq_len < window or not 0 <= tail_start <= seq_len - window:
            raise ValueError(f"row {r}: the tail [{tail_start}, {seq_len}) must hold the "
                             f"window of {window} tokens")
        block_row = block_table[b].to(dev).long()
        kept = kept_counts[s].to(dev).long()
        pages = pooled_page_table(
            page_start[s].to(dev), kept, block_row, heads, block_size,
            None if chunk_base is None else chunk_base[s].to(dev),
            None if capacity is None else int(capacity[s])).long()  # [H, P]
        virt = pages.clamp(min=0)
        paged = index(key_cache, (virt // heads, virt % heads))  # [H, P, bs, D]
        paged = dequantize(paged, k_scale, dtype).reshape(heads, -1, dim)
        pos = torch.arange(tail_start, seq_len, device=dev)
        blocks = block_row[pos // block_size] + layer_base
        tail = dequantize(index(key_cache, (blocks, slice(None), pos % block_size)), k_scale,
                          dtype).transpose(0, 1)  # [H, S - tail_start, D]
        n_tail = seq_len - window - tail_start
        for h, n in enumerate(kept.tolist()):
            if n + n_tail > width:
                raise ValueError(f"row {r}, head {h}: {n + n_tail} candidates do not fit in "
                                 f"width {width}")
            keys[r, h, :n] = paged[h, :n]
            keys[r, h, n : n + n_tail] = tail[h, :n_tail]
            counts[r, h] = n + n_tail
        wkeys[r] = tail[:, n_tail:]
    return keys, counts, wkeys


def score_decode_event_reference(
    window_queries: torch.Tensor,
    key_cache: torch.Tensor,
    page_start: torch.Tensor,
    kept_counts: torch.Tensor,
    block_table: torch.Tensor,
    rows: torch.Tensor,
    width: int,
    scale: float,
    *,
    gqa_reduce: str,
    pooling: str,
    pool_kernel: int,
    chunk_base: torch.Tensor | None = None,
    capacity: torch.Tensor | None = None,
    layer_base: int = 0,
    k_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores ``[R, H, width]`` of one decode event's candidates, read in place from the
    paged layout (-inf padding; float64 for float64 queries, fp32 otherwise).

    ``window_queries[r]`` (``[w, Hq, D]``, after RoPE) are the queries of row ``r``'s
    last ``w`` positions; the candidates of each (row, head) and the window keys are
    those of ``gather_decode_candidates`` (same arguments), scored by
    ``score_decode_windows_reference``. ``width`` (a host int) must hold every head's
    candidates: its head-page tokens plus ``S - w - tail_start``.
    """
    window = window_queries.shape[1]
    if gqa_reduce not in ("mean", "max"):
        raise ValueError(f"unknown gqa_reduce {gqa_reduce!r}")
    if pooling not in ("max", "avg"):
        raise ValueError(f"unknown pooling {pooling!r}")
    if pool_kernel < 1 or pool_kernel % 2 == 0:
        raise ValueError(f"pool_kernel must be a positive odd int, got {pool_kernel}")
    if rows.shape[0] != window_queries.shape[0]:
        raise ValueError(f"{rows.shape[0]} rows but window queries of "
                         f"{window_queries.shape[0]}")
    work = torch.float64 if window_queries.dtype == torch.float64 else torch.float32
    keys, counts, wkeys = gather_decode_candidates(
        key_cache, page_start, kept_counts, block_table, rows, window, width,
        chunk_base=chunk_base, capacity=capacity, layer_base=layer_base, k_scale=k_scale,
        dtype=work)
    return score_decode_windows_reference(
        window_queries, keys, counts, wkeys, scale, gqa_reduce=gqa_reduce, pooling=pooling,
        pool_kernel=pool_kernel)
