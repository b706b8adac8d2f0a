"""Head-pages pooled across layers: compaction places every kept token, decode reads it.

The layers of a group are views at block offsets of one buffer (as vLLM allocates them).
``compact_pooled_reference`` must put each (layer, head)'s kept tokens, in position order,
into consecutive entries of the request's pooled sequence (chunks in other layers' tensors
included), touch nothing outside the kept blocks, and use the fewest blocks; the head-wise
decode over the pooled pages must equal dense attention over exactly the kept tokens plus
the tail, computed in float64 from copies taken before compaction.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.paged_cache import random_block_tables
from vllm_adakv.kernels.compaction import compact_pooled_reference
from vllm_adakv.kernels.decode import headwise_attention_ranges_reference, pooled_page_table
from vllm_adakv.kernels.triton_decode import row_table

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
