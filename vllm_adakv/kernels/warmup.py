"""Compile the compressed path's Triton kernels before the first request.

Triton compiles a kernel the first time it is launched with a new set of
compile-time constants. Left to the first requests, that costs about a second
per kernel inside a forward pass (measured on an H200: 7 s of the first 6
prefill steps). ``warm_up`` launches every kernel the CUDA backend can launch for one
model shape on tiny scratch tensors whose strides and alignments match the real ones:
scoring (and the expected scorer's query sums), Ada-KV's allocation, compaction (in
place and into destination blocks apart from the sources, ``dst_blocks``: both launch
the same variants, both are launched here), and the head-wise decode with and without
split-K (every power-of-two split count the default heuristic can choose), and the
variants for head-pages pooled across layers (the all-layers compaction and the decode
over chunk tables, on a two-layer buffer; the plan kernel's layer tile covers groups of
up to 64 layers, ``num_layers`` compiles the one of a larger group), and with
``gvote_samples`` GVote's vote (voter attention and the top-list mass kernel, whose
voter count is compiled in). Also the decode's balanced-split variant (forward and
reduce, single-layer and pooled) on the grid the default picks at some batch sizes
(``default_balance_splits``). Settings a request overrides (another window, say) may
still compile on first use.

The caches are of ``cache_dtype``: with an fp8 KV cache the engine launches only the fp8
variants (scoring, voting and decode with ``KV_FP8``, compaction over uint8 views), so
those are what the warm-up compiles, with one-element float32 scales as vLLM's
``layer._k_scale`` / ``layer._v_scale`` (read through a pointer: their values and
addresses compile nothing).
"""

from __future__ import annotations

import time

import torch

from vllm_adakv.kernels.decode import row_table
from vllm_adakv.kernels.triton_allocation import safeguard_caps_triton
from vllm_adakv.kernels.triton_compaction import (
    compact_pooled_rows_triton,
    compact_rows_triton,
    plan_block_layers,
)
from vllm_adakv.kernels.triton_decode import (
    _MAX_SPLITS,
    DEFAULT_BALANCE_SPLITS,
    headwise_attention_ranges_triton,
)
from vllm_adakv.kernels.triton_expected import unrotated_moments_triton
from vllm_adakv.kernels.triton_recompact import compact_decode_event_triton
from vllm_adakv.kernels.triton_reselect import score_decode_event_triton
from vllm_adakv.kernels.triton_scoring import score_windows_triton
from vllm_adakv.kernels.triton_voting import min_mass_above_triton, voter_probs_triton
from vllm_adakv.kernels.voting import work_dtype

# Kernel families a method may launch (``Method.kernels``); compaction and the decode
# are compiled for every compressed model.
FAMILIES = frozenset({"scoring", "allocation", "voting"})
# Compiled with ``decode_events``: a decode event's scoring and compaction
# (``--kv-decode-budget``; the Ada-KV safeguard shares the prompt's variant).


def warm_up(device: torch.device, dtype: torch.dtype, num_q_heads: int, num_kv_heads: int,
            head_dim: int, block_size: int, window: int, gqa_reduce: str, pooling: str,
            pool_kernel: int, alpha: float, num_layers: int | None = None,
            families: frozenset[str] = FAMILIES, gvote_samples: int = 8,
            cache_dtype: torch.dtype | None = None, decode_events: bool = False) -> float:
    """Launch each kernel variant once on scratch tensors, as the backend launches them;
    returns the seconds it took. ``dtype``: the model's (queries, outputs).
    ``num_layers``: layers of a pooled group (only needed past 64, where the pooled plan
    kernel compiles another layer tile). ``families``: the selection kernels to compile
    (``FAMILIES``); the vote's voter count (``gvote_samples`` + 1) is compiled in.
    ``cache_dtype``: the KV cache's dtype as the kernels get it (``torch.float8_e4m3fn``
    or ``torch.float8_e5m2`` for an fp8 cache, ``kernels.fp8``); None: ``dtype``.
    ``decode_events``: also the decode events' kernels (``warm_up_decode_events``)."""
    unknown = set(families) - FAMILIES
    if unknown:
        raise ValueError(f"unknown kernel families {sorted(unknown)}; known: {sorted(FAMILIES)}")
    start = time.perf_counter()
    # Two requests of different lengths (several score tiles, partial last blocks).
    lengths = [window + 4 * 64 + block_size + 3, window + 2 * block_size + 1]
    blocks = -(-max(lengths) // block_size) + 2
    # Caches as the backend sees them: [nb, H, bs, 2D] per layer, keys then values; the
    # requests' blocks, then as many fresh ones (compaction destinations).
    cache_dtype = dtype if cache_dtype is None else cache_dtype
    kv = torch.randn(4 * blocks + 1, num_kv_heads, block_size, 2 * head_dim, device=device,
                     dtype=dtype).to(cache_dtype)
    key_cache, value_cache = kv[..., :head_dim], kv[..., head_dim:]
    # Per-layer scales (used for fp8 caches only, ignored otherwise).
    k_scale = torch.ones(1, dtype=torch.float32, device=device)
    scales = dict(k_scale=k_scale, v_scale=torch.ones_like(k_scale))
    table = torch.arange(1, 2 * blocks + 1, dtype=torch.int32, device=device).view(2, blocks)
    fresh = torch.arange(2 * blocks + 1, 4 * blocks + 1, dtype=torch.int32,
                         device=device).view(2, blocks)
    queries = torch.randn(2, window, num_q_heads, head_dim, device=device, dtype=dtype)
    budgets = [window + 2 * block_size, window + block_size]
    # Keep masks of two shapes (as two methods' selections would give) for the compaction.
    method_masks = []
    for shift in (0, 1):
        masks = torch.zeros(2, num_kv_heads, max(lengths), dtype=torch.bool, device=device)
        for r, (length, budget) in enumerate(zip(lengths, budgets, strict=True)):
            for h in range(num_kv_heads):
                keep = budget - (h + shift) % 2 * (block_size // 2)
                masks[r, h, length - keep : length] = True
        method_masks.append(masks)
        compact_rows_triton(key_cache, value_cache, table, [1, 0], masks,
                            [-(-n // block_size) for n in lengths],
                            dst_blocks=fresh if shift else None)
    if "scoring" in families:
        score_windows_triton(queries, key_cache, table, [1, 0], lengths, head_dim**-0.5,
                             gqa_reduce=gqa_reduce, pooling=pooling, pool_kernel=pool_kernel,
                             k_scale=k_scale)
        # The expected scorer's (``methods.scorers``; any request may ask for it) per-chunk
        # moments of the prompt queries rotated back (a strided view of a packed q/k/v
        # row, as the backend's queries are); its scoring is torch.
        packed = torch.randn(window, num_q_heads + 2 * num_kv_heads, head_dim,
                             device=device, dtype=dtype)
        cos_sin = torch.ones(window, head_dim, device=device, dtype=torch.float32)
        unrotated_moments_triton(packed[:, :num_q_heads], torch.arange(window, device=device),
                                 cos_sin, head_dim, True)
    if "allocation" in families:
        selectable = [b - window for b in budgets]
        hits = torch.tensor([[s] * num_kv_heads for s in selectable], device=device)
        safeguard_caps_triton(hits, selectable, alpha, [n - window for n in lengths])
    if "voting" in families:
        voters = torch.randn(2, gvote_samples + 1, num_q_heads, head_dim, device=device,
                             dtype=work_dtype(queries))
        probs = voter_probs_triton(voters, key_cache, table, [1, 0], lengths, head_dim**-0.5,
                                   k_scale=k_scale)
        min_mass_above_triton(probs, lengths, 0.9, max(budgets))
    # Pooled: layers of one buffer at block offsets (the all-layers view has the layer
    # view's strides), compacted at once; then the decode over their chunk tables.
    layers = 2
    if num_layers is not None and plan_block_layers(num_layers) != plan_block_layers(layers):
        layers = num_layers
    layer_blocks = kv.shape[0]
    kv_all = torch.randn(layers * layer_blocks, *kv.shape[1:], device=device,
                         dtype=dtype).to(cache_dtype)
    all_keys, all_values = kv_all[..., :head_dim], kv_all[..., head_dim:]
    layer_bases = torch.arange(layers, dtype=torch.int32, device=device) * layer_blocks
    pooled_masks = torch.stack([method_masks[k % 2] for k in range(layers)], dim=1)
    for kept_blocks, dst_blocks in (([None, None], fresh),
                                    ([-(-n // block_size) for n in lengths], None)):
        _, _, chunk_layer, kept = compact_pooled_rows_triton(
            all_keys, all_values, table, [1, 0], pooled_masks, layer_bases, kept_blocks,
            dst_blocks=dst_blocks)
    # Decode: page ranges of 2 slots x 2 layers (the layer-1 column starts off 16 bytes).
    pages = torch.zeros(2, 2, num_kv_heads, dtype=torch.int32, device=device)
    counts = torch.full_like(pages, 2 * block_size)
    idx = torch.arange(2)
    rows = row_table(idx, idx, idx, idx + 1, torch.full((2,), lengths[1]),
                     torch.full((2,), lengths[1] + 1)).to(device)
    q = torch.randn(2, num_q_heads, head_dim, device=device, dtype=dtype)
    out = torch.empty_like(q)
    splits = 1
    # Chunk tables of 2 slots as the backend keeps them (int32, on the device); the
    # same 2 pages per head from entry 0 (chunk 0, or 1 if a chunk holds one entry).
    chunk_base = layer_bases[chunk_layer.long()]
    capacity = kept * num_kv_heads
    while splits <= _MAX_SPLITS:
        for layer in (0, 1):
            headwise_attention_ranges_triton(q, key_cache, value_cache, pages[:, layer],
                                             counts[:, layer], table, rows, 2,
                                             head_dim**-0.5, out, num_splits=splits, **scales)
            if splits <= 2:
                # The pooled forward kernel has one variant without split-K and one with
                # (the split count is not specialised on); the reduce kernel is shared.
                headwise_attention_ranges_triton(
                    q, all_keys, all_values, pages[:, layer], counts[:, layer], table, rows,
                    2, head_dim**-0.5, out, num_splits=splits, chunk_base=chunk_base,
                    capacity=capacity, layer_base=layer * layer_blocks, **scales)
        splits *= 2
    # The balanced decode the default picks at some batch sizes: one forward variant per
    # (pooled or not) and one reduce for its grid (BLOCK_S); the minimum iteration count
    # is not specialised on.
    for layer in (0, 1):
        headwise_attention_ranges_triton(q, key_cache, value_cache, pages[:, layer],
                                         counts[:, layer], table, rows, 2, head_dim**-0.5,
                                         out, balance_splits=DEFAULT_BALANCE_SPLITS, **scales)
        headwise_attention_ranges_triton(
            q, all_keys, all_values, pages[:, layer], counts[:, layer], table, rows, 2,
            head_dim**-0.5, out, chunk_base=chunk_base, capacity=capacity,
            layer_base=layer * layer_blocks, balance_splits=DEFAULT_BALANCE_SPLITS, **scales)
    if decode_events:
        warm_up_decode_events(key_cache, value_cache, num_q_heads, window, gqa_reduce,
                              pooling, pool_kernel, k_scale, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def warm_up_decode_events(key_cache: torch.Tensor, value_cache: torch.Tensor,
                          num_q_heads: int, window: int, gqa_reduce: str, pooling: str,
                          pool_kernel: int, k_scale: torch.Tensor,
                          dtype: torch.dtype = torch.float32) -> None:
    """One decode event on scratch caches ``[nb, H, bs, D]`` (at least ``window + 3 bs``
    tokens of blocks): scoring the candidates in place with window queries of the model's
    ``dtype`` (as the events pass them), then compacting a selection (their widths and
    lengths are not specialised on)."""
    _, heads, block_size, head_dim = key_cache.shape
    device = key_cache.device
    # One row: each head holds half a head-page (entry h: slot h of the row's first
    # block), then a tail of 3 tokens before the window.
    tail_start = 2 * block_size
    seq_len = tail_start + window + 3
    blocks = -(-seq_len // block_size)
    if blocks + 1 > key_cache.shape[0]:
        raise ValueError(f"scratch caches of {key_cache.shape[0]} blocks cannot hold an "
                         f"event of {seq_len} tokens")
    table = torch.arange(1, blocks + 1, dtype=torch.int32, device=device).view(1, blocks)
    page_start = torch.arange(heads, dtype=torch.int32, device=device).view(1, heads)
    counts = torch.full_like(page_start, block_size // 2)
    zero = torch.zeros(1)
    rows = row_table(zero, zero, zero, zero, torch.full((1,), tail_start),
                     torch.full((1,), seq_len)).to(device)
    width = block_size // 2 + 3
    queries = torch.randn(1, window, num_q_heads, head_dim, device=device, dtype=dtype)
    score_decode_event_triton(queries, key_cache, page_start, counts, table, rows, width,
                              head_dim**-0.5, gqa_reduce=gqa_reduce, pooling=pooling,
                              pool_kernel=pool_kernel, k_scale=k_scale)
    keep = torch.zeros(1, heads, width, dtype=torch.bool, device=device)
    keep[..., :2] = True
    compact_decode_event_triton(key_cache, value_cache, page_start, counts, table, rows,
                                keep, window, [1])
