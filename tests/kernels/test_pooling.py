"""Head-pages pooled across layers: compaction places every kept token, decode reads it.

The layers of a group are views at block offsets of one buffer (as vLLM allocates them).
``compact_pooled_reference`` must put each (layer, head)'s kept tokens, in position order,
into consecutive entries of the request's pooled sequence (chunks in other layers' tensors
included), touch nothing outside the kept blocks, and use the fewest blocks; the head-wise
decode over the pooled pages must equal dense attention over exactly the kept tokens plus
the tail, computed in float64 from copies taken before compaction.

The Triton versions (under the interpreter here) must equal the references: the pooled
compaction of several requests at once byte for byte (caches and returned tables), the
decode over chunk tables to fp32 tolerance, on rows picked out of a larger batch.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.kernels.paged_cache import (  # noqa: E402
    assert_pooled_triton_matches_reference,
    random_block_tables,
)
from vllm_adakv.kernels import headwise_attention_ranges_reference  # noqa: E402
from vllm_adakv.kernels.compaction import (  # noqa: E402
    compact_pooled_reference,
    compact_pooled_rows_reference,
)
from vllm_adakv.kernels.decode import (
    pooled_page_table,  # noqa: E402
    row_table,  # noqa: E402
)

BS = 16


def _uneven_masks(layers: int, heads: int, length: int, seed: int) -> torch.Tensor:
    """Keep masks whose layers keep very different amounts (layer 0 nearly everything)."""
    gen = torch.Generator().manual_seed(seed)
    rates = torch.linspace(0.9, 0.05, layers)[torch.randperm(layers, generator=gen)]
    keep = torch.rand(layers, heads, length, generator=gen) < rates[:, None, None]
    keep[:, :, -4:] = True
    return keep


def _pooled_cache(layers: int, heads: int, dim: int, nb: int, bases: list[int]):
    """A buffer of ``max(bases) + nb`` blocks holding every layer at its block offset."""
    total = max(bases) + nb
    kc = torch.randn(total, heads, BS, dim)
    vc = torch.randn(total, heads, BS, dim)
    return kc, vc, torch.tensor(bases, dtype=torch.int32)


def _kept(cache: torch.Tensor, base: int, block_row: torch.Tensor, mask: torch.Tensor
          ) -> torch.Tensor:
    pos = mask.nonzero().flatten()
    return cache[base + block_row.long()[pos // BS], :, pos % BS]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("bases_kind", ["contiguous", "shuffled"])
def test_pooled_compaction_places_every_kept_token(seed, bases_kind):
    layers, heads, dim, length = 5, 4, 8, 200
    torch.manual_seed(seed)
    table, nb = random_block_tables([length], BS)
    order = list(range(layers)) if bases_kind == "contiguous" else torch.randperm(layers).tolist()
    bases = [k * nb for k in order]
    kc, vc, layer_bases = _pooled_cache(layers, heads, dim, nb, bases)
    masks = _uneven_masks(layers, heads, length, seed)
    k0, v0 = kc.clone(), vc.clone()
    page_start, counts, chunk_layer, m = compact_pooled_reference(
        kc, vc, table[0], masks, layer_bases, None)

    pages = (masks.sum(2) + BS - 1) // BS
    assert m == max(1, -(-int(pages.sum()) // (layers * heads)))
    assert m < int(pages.sum(1).max()) // heads  # pooling saves blocks here
    assert torch.equal(counts, masks.sum(2).int())
    assert sorted(chunk_layer.tolist()) == list(range(layers))
    capacity = m * heads
    chunk_base = layer_bases[chunk_layer.long()]
    crossed = False
    for k in range(layers):
        for h in range(heads):
            n = int(counts[k, h])
            table_kh = pooled_page_table(page_start[k, h : h + 1], counts[k, h : h + 1],
                                         table[0], heads, BS, chunk_base, capacity)[0]
            first = int(page_start[k, h])
            crossed |= (first // capacity) != int((chunk_layer == k).nonzero()[0, 0])
            got_k = kc[table_kh.long() // heads, table_kh.long() % heads].reshape(-1, dim)[:n]
            got_v = vc[table_kh.long() // heads, table_kh.long() % heads].reshape(-1, dim)[:n]
            assert torch.equal(got_k, _kept(k0, bases[k], table[0], masks[k, h])[:, h])
            assert torch.equal(got_v, _kept(v0, bases[k], table[0], masks[k, h])[:, h])
    assert crossed  # some layer's pages lie in another layer's tensor
    # Only the kept blocks [0, m) of the request changed, in every layer tensor.
    changed = (kc != k0).flatten(1).any(1).nonzero().flatten().tolist()
    allowed = {b + int(table[0, i]) for b in bases for i in range(m)}
    assert set(changed) <= allowed


def test_pooled_compaction_refuses_too_few_blocks():
    layers, heads, dim, length = 3, 2, 8, 96
    table, nb = random_block_tables([length], BS)
    kc, vc, bases = _pooled_cache(layers, heads, dim, nb, [0, nb, 2 * nb])
    masks = torch.ones(layers, heads, length, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="reserved"):
        compact_pooled_reference(kc, vc, table[0], masks, bases, length // BS - 1)


def _dense_kept_attention(q, keys, values, scale):
    logits = (q.double() @ keys.double().T) * scale
    return torch.softmax(logits, -1) @ values.double()


@pytest.mark.parametrize("group", [1, 4])
def test_pooled_decode_equals_dense_over_kept_tokens(group):
    layers, heads, dim = 4, 2, 16
    lengths = [180, 131]
    tail = 5  # generated tokens after each prompt (the last one is the query's)
    torch.manual_seed(group)
    table, nb = random_block_tables([n + tail for n in lengths], BS)
    bases = [k * nb for k in torch.randperm(layers).tolist()]
    kc, vc, layer_bases = _pooled_cache(layers, heads, dim, nb, bases)
    k0, v0 = kc.clone(), vc.clone()
    num_slots = 3
    slots = [2, 0]
    start_tab = torch.zeros(num_slots, layers, heads, dtype=torch.int32)
    count_tab = torch.zeros_like(start_tab)
    chunk_tab = torch.zeros(num_slots, layers, dtype=torch.int32)
    cap_tab = torch.zeros(num_slots, dtype=torch.int32)
    masks = []
    for r, n in enumerate(lengths):
        # Prompt positions past the kept blocks that share the tail block stay readable.
        mask = _uneven_masks(layers, heads, n, seed=10 + r)
        masks.append(mask)
        ps, cnt, order, m = compact_pooled_reference(kc, vc, table[r], mask, layer_bases, None)
        assert m < n // BS
        s = slots[r]
        start_tab[s], count_tab[s] = ps, cnt
        chunk_tab[s] = layer_bases[order.long()]
        cap_tab[s] = m * heads
    scale = dim**-0.5
    q = torch.randn(len(lengths), heads * group, dim)
    idx = torch.arange(len(lengths))
    seq = torch.tensor([n + tail for n in lengths])
    rows = row_table(idx, torch.tensor(slots), idx, idx + 1, torch.tensor(lengths), seq)
    for k in range(layers):
        out = torch.full_like(q, float("nan"))
        headwise_attention_ranges_reference(
            q, kc, vc, start_tab[:, k], count_tab[:, k], table, rows, len(lengths), scale, out,
            chunk_base=chunk_tab, capacity=cap_tab, layer_base=bases[k])
        for r, n in enumerate(lengths):
            tail_pos = torch.arange(n, n + tail)
            tail_blocks = bases[k] + table[r].long()[tail_pos // BS]
            for h in range(heads):
                keys = torch.cat([_kept(k0, bases[k], table[r], masks[r][k, h])[:, h],
                                  k0[tail_blocks, h, tail_pos % BS]])
                values = torch.cat([_kept(v0, bases[k], table[r], masks[r][k, h])[:, h],
                                    v0[tail_blocks, h, tail_pos % BS]])
                want = _dense_kept_attention(q[r, h * group : (h + 1) * group], keys, values,
                                             scale)
                torch.testing.assert_close(out[r, h * group : (h + 1) * group].double(), want,
                                           atol=1e-5, rtol=1e-5)


# Triton versions against the references.


def _pooled_batch_masks(lengths: list[int], layers: int, heads: int, ties: bool = False
                        ) -> torch.Tensor:
    """``[R, K, H, Lmax]`` masks: per request very uneven layers (fresh random rates), False
    past each prompt, the last 4 prompt positions kept. ``ties``: request 0's layers 1 and
    3 keep the same positions (equal page counts: the stable order decides)."""
    masks = torch.zeros(len(lengths), layers, heads, max(lengths), dtype=torch.bool)
    for r, n in enumerate(lengths):
        rates = torch.rand(layers) ** 2
        rates[torch.randint(layers, ())] = 0.9
        keep = torch.rand(layers, heads, n) < rates[:, None, None]
        keep[:, :, n - 4 : n] = True
        masks[r, :, :, :n] = keep
    if ties:
        masks[0, 3] = masks[0, 1]
    return masks


def _pooled_kv(layers: int, heads: int, dim: int, nb: int, dtype: torch.dtype):
    """One buffer ``[K * nb + 1, H, bs, 2D]`` (keys then values per token), layers at
    shuffled block offsets."""
    bases = [k * nb for k in torch.randperm(layers).tolist()]
    kv = torch.randn(layers * nb + 1, heads, BS, 2 * dim).to(dtype)
    return kv, torch.tensor(bases, dtype=torch.int32)


@pytest.mark.parametrize("dtype,heads,dim,kept,fused", [
    (torch.float32, 2, 32, "none", True),
    (torch.bfloat16, 4, 64, "given", True),
    (torch.float16, 2, 16, "mixed", True),
    (torch.float32, 2, 32, "given", False),
    (torch.bfloat16, 2, 16, "none", False),
])
def test_triton_pooled_compaction_matches_reference(dtype, heads, dim, kept, fused,
                                                    monkeypatch):
    """R requests of a shared block table (shuffled rows, different lengths), all layers at
    once: byte-exact caches, equal page_start/counts/chunk_layer/kept_blocks. ``fused``:
    one launch per pass (double scratch), else two (the large-scratch path)."""
    from vllm_adakv.kernels import triton_compaction

    if not fused:
        monkeypatch.setattr(triton_compaction, "_FUSED_SCRATCH_BYTES", 0)

    layers = 4
    lengths = [int(torch.randint(40, 200, ())) for _ in range(3)]
    table, nb = random_block_tables(lengths, BS)
    kv, layer_bases = _pooled_kv(layers, heads, dim, nb, dtype)
    block_rows = [2, 0, 1]
    masks = _pooled_batch_masks([lengths[b] for b in block_rows], layers, heads, ties=True)
    pages = (masks.sum(3) + BS - 1) // BS
    need = [max(1, -(-int(p.sum()) // (layers * heads))) for p in pages]
    if kept == "none":
        kept_blocks = [None] * 3
    elif kept == "given":
        kept_blocks = [need[0], need[1] + 2, need[2] + 1]  # tight, and with spare blocks
    else:
        kept_blocks = [None, need[1], None]
    assert_pooled_triton_matches_reference(kv, dim, table, block_rows, masks, layer_bases,
                                           kept_blocks)


def test_triton_pooled_compaction_refuses_too_few_blocks():
    from vllm_adakv.kernels.triton_compaction import compact_pooled_rows_triton

    layers, heads, dim = 3, 2, 16
    lengths = [96, 64]
    table, nb = random_block_tables(lengths, BS)
    kv, layer_bases = _pooled_kv(layers, heads, dim, nb, torch.float32)
    masks = torch.zeros(2, layers, heads, 96, dtype=torch.bool)
    masks[0] = True
    masks[1, :, :, :64] = True
    with pytest.raises(RuntimeError, match="reserved"):
        compact_pooled_rows_triton(kv[..., :dim], kv[..., dim:], table, [0, 1], masks,
                                   layer_bases, [None, 64 // BS - 1])


def _pooled_decode_batch(group: int, dim: int, dtype: torch.dtype, one_big_layer: bool = False
                         ) -> dict:
    """A batch of 5 requests compacted (pooled, reference) over 3 layers; their tables at
    shuffled slots of larger tables; rows: a subset of the batch, out of order.
    ``one_big_layer``: 8 layers, layer 0 keeping every prompt token and the others only the
    last 4, so chunks are small (2 blocks) and a head's pages span several of them."""
    heads, layers, batch = 2, 8 if one_big_layer else 3, 5
    lengths = [int(x) for x in torch.randint(40, 130, (batch,))]
    q_lens = [1, 3, 2, 1, 4]
    seq = [n + int(torch.randint(q, q + 10, ())) for n, q in zip(lengths, q_lens, strict=True)]
    table, nb = random_block_tables(seq, BS)
    kv, layer_bases = _pooled_kv(layers, heads, dim, nb, dtype)
    kc, vc = kv[..., :dim], kv[..., dim:]
    masks = _pooled_batch_masks(lengths, layers, heads)
    if one_big_layer:
        masks[:] = False
        for r, n in enumerate(lengths):
            masks[r, 0, :, :n] = True
            masks[r, 1:, :, n - 4 : n] = True
    starts, counts, chunk_layer, kept = compact_pooled_rows_reference(
        kc, vc, table, list(range(batch)), masks, layer_bases, [None] * batch)
    first_chunk = (starts // (kept * heads)[:, None, None]).long()
    owner = chunk_layer.long().gather(1, first_chunk.flatten(1)).view_as(first_chunk)
    assert (owner != torch.arange(layers)[None, :, None]).any(), "no pages in other layers"
    num_slots = 7
    slots = torch.randperm(num_slots)[:batch]
    start_tab = torch.zeros(num_slots, layers, heads, dtype=torch.int32)
    count_tab = torch.zeros_like(start_tab)
    chunk_tab = torch.zeros(num_slots, layers, dtype=torch.int32)
    cap_tab = torch.zeros(num_slots, dtype=torch.int32)
    start_tab[slots], count_tab[slots] = starts, counts
    chunk_tab[slots] = layer_bases[chunk_layer.long()]
    cap_tab[slots] = kept * heads
    qsl = torch.tensor([0, *torch.cumsum(torch.tensor(q_lens), 0).tolist()], dtype=torch.int32)
    query = torch.randn(int(qsl[-1]) + 2, heads * group, dim).to(dtype)
    picked = torch.tensor([3, 0, 1])
    rows = row_table(picked, slots[picked], qsl[picked], qsl[picked + 1],
                     torch.tensor(lengths)[picked], torch.tensor(seq)[picked])
    return dict(query=query, key_cache=kc, value_cache=vc, start_tab=start_tab,
                count_tab=count_tab, block_table=table, rows=rows, chunk_base=chunk_tab,
                capacity=cap_tab, layer_bases=layer_bases,
                num_row_tokens=int((qsl[picked + 1] - qsl[picked]).sum()), scale=dim**-0.5)


def _run_pooled_decode(x: dict, layer: int, impl, chunks: bool = True, **options
                       ) -> torch.Tensor:
    out = torch.full_like(x["query"], float("nan"))
    impl(x["query"], x["key_cache"], x["value_cache"], x["start_tab"][:, layer],
         x["count_tab"][:, layer], x["block_table"], x["rows"], x["num_row_tokens"],
         x["scale"], out, chunk_base=x["chunk_base"] if chunks else None,
         capacity=x["capacity"] if chunks else None,
         layer_base=int(x["layer_bases"][layer]), **options)
    return out


def _check_pooled_decode(x: dict, tol: float, chunks: bool = True, **options) -> None:
    """Every layer (each reads pages in other layers' tensors): Triton == reference on the
    rows' tokens, NaN (untouched) elsewhere."""
    from vllm_adakv.kernels.triton_decode import headwise_attention_ranges_triton

    written = torch.zeros(x["query"].shape[0], dtype=torch.bool)
    for _, _, q0, q1, *_ in x["rows"].tolist():
        written[q0:q1] = True
    for layer in range(x["start_tab"].shape[1]):
        want = _run_pooled_decode(x, layer, headwise_attention_ranges_reference, chunks)
        got = _run_pooled_decode(x, layer, headwise_attention_ranges_triton, chunks,
                                 **options)
        assert not torch.isnan(got[written]).any(), "row tokens not fully written"
        assert torch.isnan(got[~written]).all(), "tokens of other rows must be left untouched"
        torch.testing.assert_close(got[written].float(), want[written].float(), rtol=tol,
                                   atol=tol)


@pytest.mark.parametrize("group,dim,num_splits,pages_per_iter", [
    (1, 64, 1, 1), (4, 128, 3, None), (8, 64, None, 2)])
def test_triton_pooled_decode_matches_reference(group, dim, num_splits, pages_per_iter):
    x = _pooled_decode_batch(group, dim, torch.float32)
    _check_pooled_decode(x, 1e-4, num_splits=num_splits, pages_per_iter=pages_per_iter)


def test_triton_pooled_decode_pages_over_several_chunks():
    """Tiles of 8 head-pages over chunks of fewer entries (several chunk boundaries in a
    tile): the kernel's general path."""
    x = _pooled_decode_batch(2, 16, torch.float32, one_big_layer=True)
    assert int(x["capacity"].max()) < 8
    _check_pooled_decode(x, 1e-4, num_splits=1, pages_per_iter=8)


def test_triton_decode_layer_base_without_chunks():
    """A layer's tail in the all-layers view while the pages use the single-layer layout
    (no chunk tables): as the reference reads it."""
    x = _pooled_decode_batch(1, 16, torch.float32)
    pages = (x["count_tab"] + BS - 1) // BS
    x["start_tab"] = (torch.cumsum(pages, 2) - pages).to(torch.int32)  # heads in order
    _check_pooled_decode(x, 1e-4, chunks=False, num_splits=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_pooled_decode_low_precision(dtype):
    x = _pooled_decode_batch(4, 64, dtype)
    _check_pooled_decode(x, 2e-2, num_splits=2)


def test_triton_pooled_compaction_many_layers():
    """More layers than the plan kernel's default layer tile (another compiled variant)."""
    from vllm_adakv.kernels.triton_compaction import compact_pooled_rows_triton, plan_block_layers

    layers, heads, dim, lengths = 70, 1, 8, [40, 23]
    assert plan_block_layers(layers) > plan_block_layers(2)
    table, nb = random_block_tables(lengths, BS)
    kv, layer_bases = _pooled_kv(layers, heads, dim, nb, torch.float32)
    masks = _pooled_batch_masks(lengths, layers, heads)
    want_kv = kv.clone()
    want = compact_pooled_rows_reference(want_kv[..., :dim], want_kv[..., dim:], table, [0, 1],
                                         masks, layer_bases, [None, None])
    got = compact_pooled_rows_triton(kv[..., :dim], kv[..., dim:], table, [0, 1], masks,
                                     layer_bases, [None, None])
    for name, g, w in zip(("page_start", "counts", "chunk_layer", "kept_blocks"), got, want,
                          strict=True):
        assert torch.equal(g, w), (name, g, w)
    assert torch.equal(kv, want_kv)

