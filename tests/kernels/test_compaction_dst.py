"""Compaction into destination blocks apart from the sources (``dst_blocks``).

With prefix caching a request's first blocks may be shared or hashed, so compaction
writes into fresh blocks instead. Here the destinations are fresh block ids, disjoint
from every source (plus spare fresh ids past the ones a row may use). For the references
(own-layer rows and pooled rows, a measured row among them) the compaction into them
must: leave every block other than the row's first ``kept_blocks`` destinations bitwise
unchanged (the sources included), return the same tables as in-place compaction of a
copy, and put the same head-page sequence there (entry i of the destinations holds what
entry i of the in-place blocks holds, i.e. each head's kept tokens in position order, as
read from the caches before compaction). The Triton versions (interpreter) must equal
the references with the same destinations byte for byte, and in place still equal them.
fp8 caches (and uint8 ones) hold random bytes, NaN patterns included: compaction moves
bytes, and the references move the values a float64 copy of the cache moves.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from tests.kernels.paged_cache import (  # noqa: E402
    assert_pooled_triton_matches_reference,
    random_block_tables,
)
from vllm_adakv.kernels.compaction import (  # noqa: E402
    compact_pooled_reference,
    compact_pooled_rows_reference,
    compact_ranges_reference,
    compact_rows_reference,
)

BS = 16
WINDOW = 8


def _keep_masks(lengths: list[int], heads: int, width: int) -> torch.Tensor:
    """``[R, H, width]`` uneven per-head keep masks (window kept, False past each prompt)."""
    masks = torch.zeros(len(lengths), heads, width, dtype=torch.bool)
    for r, n in enumerate(lengths):
        keep = torch.rand(heads, n) < torch.rand(heads, 1)
        keep[:, n - WINDOW:] = True
        masks[r, :, :n] = keep
    return masks


def _pooled_masks(lengths: list[int], layers: int, heads: int, width: int) -> torch.Tensor:
    """``[R, K, H, width]``: per request very uneven layers (one keeps 90%), the last 4
    prompt positions kept, False past each prompt."""
    masks = torch.zeros(len(lengths), layers, heads, width, dtype=torch.bool)
    for r, n in enumerate(lengths):
        rates = torch.rand(layers) ** 2
        rates[torch.randint(layers, ())] = 0.9
        keep = torch.rand(layers, heads, n) < rates[:, None, None]
        keep[:, :, n - 4:n] = True
        masks[r, :, :, :n] = keep
    return masks


def _needed_blocks(masks: torch.Tensor) -> list[int]:
    """Blocks each row's pages need (own-layer ``[R, H, L]`` or pooled ``[R, K, H, L]``)."""
    heads = masks.shape[-2]
    pages = ((masks.sum(-1) + BS - 1) // BS).flatten(1).sum(1)
    per = heads * (masks.shape[1] if masks.dim() == 4 else 1)
    return [max(1, -(-int(p) // per)) for p in pages]


def _random_kv(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """Random caches; one-byte dtypes (fp8, uint8) as random bytes."""
    if torch.empty(0, dtype=dtype).element_size() == 1:
        return torch.randint(0, 256, shape, dtype=torch.uint8).view(dtype)
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def _fresh_dst(rows: int, width: int, first: int) -> torch.Tensor:
    """``[R, W]`` distinct fresh block ids in ``[first, first + R * W)``, shuffled."""
    return (first + torch.randperm(rows * width)).view(rows, width).to(torch.int32)


def _written(dst: torch.Tensor, kept: list[int], bases: list[int]) -> set[int]:
    """The blocks compaction into ``dst`` may write: each row's first kept ids, per layer."""
    return {b + int(x) for r, m in enumerate(kept) for x in dst[r, :m] for b in bases}


def _assert_only_written_changed(before: torch.Tensor, after: torch.Tensor,
                                 sources: set[int], written: set[int]) -> None:
    assert not sources & written, "test setup: destinations must be fresh"
    same = (before.view(torch.uint8) == after.view(torch.uint8)).flatten(1).all(1)
    changed = set((~same).nonzero().flatten().tolist())
    assert not changed & sources, "a source block was written"
    assert changed <= written, f"blocks outside the destinations changed: {changed - written}"
    assert changed, "nothing was written into the destinations"


def _head_tokens(cache: torch.Tensor, blocks: torch.Tensor, start: int, count: int
                 ) -> torch.Tensor:
    """A head's ``count`` tokens from entry ``start`` on of the head-page sequence of
    ``blocks`` (entry i: block ``blocks[i // H]``, slot ``i % H``)."""
    heads = cache.shape[1]
    t = torch.arange(count)
    entry = start + t // BS
    return cache[blocks.long()[entry // heads], entry % heads, t % BS]


def _pooled_tokens(cache: torch.Tensor, blocks: torch.Tensor, layer_bases: torch.Tensor,
                   start: int, count: int, chunk_layer: torch.Tensor, kept: int
                   ) -> torch.Tensor:
    """A head's tokens in the pooled sequence (chunk k: layer ``chunk_layer[k]``'s tensor,
    entry e of a chunk block ``blocks[e // H]``, slot ``e % H``)."""
    heads = cache.shape[1]
    t = torch.arange(count)
    entry = start + t // BS
    chunk, local = entry // (kept * heads), entry % (kept * heads)
    block = layer_bases.long()[chunk_layer.long()[chunk]] + blocks.long()[local // heads]
    return cache[block, local % heads, t % BS]


def _kept_tokens(cache: torch.Tensor, base: int, block_row: torch.Tensor, head: int,
                 mask: torch.Tensor) -> torch.Tensor:
    """Head ``head``'s kept tokens in position order, from the normal layout."""
    pos = mask.nonzero().flatten()
    return cache[base + block_row.long()[pos // BS], head, pos % BS]


def _rows_case(heads: int, dim: int, dtype: torch.dtype, spare: int = 1):
    """Three requests of one layer (block rows shuffled, kept blocks tight and with spare
    ones), fresh destinations after the table's blocks (``spare`` unused ids per row)."""
    lengths = [int(torch.randint(40, 200, ())) for _ in range(3)]
    table, nb = random_block_tables(lengths, BS)
    block_rows = [2, 0, 1]
    masks = _keep_masks([lengths[b] for b in block_rows], heads, max(lengths))
    need = _needed_blocks(masks)
    kept = [need[0], need[1] + 1, need[2] + 2]
    dst = _fresh_dst(3, max(kept) + spare, nb)
    kv = _random_kv(nb + dst.numel(), heads, BS, 2 * dim, dtype=dtype)
    return table, block_rows, masks, kept, dst, kv


def _pooled_case(layers: int, heads: int, dim: int, dtype: torch.dtype, kept_kind: str):
    """Three requests over ``layers`` layers of one buffer (layers at shuffled block
    offsets), fresh destinations after the table's blocks in every layer tensor.
    kept_kind: "none" (measured), "given" (tight and with spare) or "mixed"."""
    lengths = [int(torch.randint(40, 200, ())) for _ in range(3)]
    table, nb = random_block_tables(lengths, BS)
    block_rows = [1, 2, 0]
    masks = _pooled_masks([lengths[b] for b in block_rows], layers, heads, max(lengths))
    need = _needed_blocks(masks)
    kept_blocks = {"none": [None] * 3, "given": [need[0], need[1] + 2, need[2] + 1],
                   "mixed": [None, need[1] + 1, need[2]]}[kept_kind]
    kept = [n if k is None else k for n, k in zip(need, kept_blocks, strict=True)]
    dst = _fresh_dst(3, max(kept) + 1, nb)
    per_layer = nb + dst.numel()
    bases = [k * per_layer for k in torch.randperm(layers).tolist()]
    kv = _random_kv(layers * per_layer, heads, BS, 2 * dim, dtype=dtype)
    return (table, block_rows, masks, kept_blocks, kept, dst, kv,
            torch.tensor(bases, dtype=torch.int32))


def _sources(table: torch.Tensor, block_rows: list[int], bases: list[int]) -> set[int]:
    return {b + int(x) for r in block_rows for x in table[r] if int(x) > 0 for b in bases}


# References.


@pytest.mark.parametrize("heads", [1, 2, 8])
def test_rows_reference_into_fresh_blocks(heads):
    dim = 8
    table, block_rows, masks, kept, dst, kv = _rows_case(heads, dim, torch.float64)
    in_place, into = kv.clone(), kv.clone()
    want = compact_rows_reference(in_place[..., :dim], in_place[..., dim:], table, block_rows,
                                  masks, kept)
    got = compact_rows_reference(into[..., :dim], into[..., dim:], table, block_rows, masks,
                                 kept, dst_blocks=dst)
    for name, g, w in zip(("page_start", "counts"), got, want, strict=True):
        assert g.dtype == torch.int32 and torch.equal(g, w), name
    _assert_only_written_changed(kv, into, _sources(table, block_rows, [0]),
                                 _written(dst, kept, [0]))
    starts, counts = got
    for r, b in enumerate(block_rows):
        for h in range(heads):
            start, count = int(starts[r, h]), int(counts[r, h])
            got_kv = _head_tokens(into, dst[r], start, count)
            in_place_kv = _head_tokens(in_place, table[b], start, count)
            assert torch.equal(got_kv, in_place_kv)
            assert torch.equal(got_kv, _kept_tokens(kv, 0, table[b], h, masks[r, h]))


def test_ranges_reference_into_fresh_blocks():
    """One request, destinations given as an int64 row: the same pages at the given
    blocks; only their first kept_blocks change."""
    heads, dim, length = 4, 8, 150
    table, nb = random_block_tables([length], BS)
    keep = _keep_masks([length], heads, length)[0]
    kept = _needed_blocks(keep[None])[0] + 1
    dst = _fresh_dst(1, kept + 2, nb)[0].long()
    kv = torch.randn(nb + dst.numel(), heads, BS, 2 * dim, dtype=torch.float64)
    in_place, into = kv.clone(), kv.clone()
    want = compact_ranges_reference(in_place[..., :dim], in_place[..., dim:], table[0], keep,
                                    kept)
    got = compact_ranges_reference(into[..., :dim], into[..., dim:], table[0], keep, kept,
                                   dst_blocks=dst)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    _assert_only_written_changed(kv, into, _sources(table, [0], [0]),
                                 _written(dst[None], [kept], [0]))
    for h in range(heads):
        start, count = int(got[0][h]), int(got[1][h])
        assert torch.equal(_head_tokens(into, dst, start, count),
                           _head_tokens(in_place, table[0], start, count))


@pytest.mark.parametrize("heads", [1, 2, 8])
@pytest.mark.parametrize("kept_kind", ["mixed", "none"])
def test_pooled_rows_reference_into_fresh_blocks(heads, kept_kind):
    layers, dim = 4, 8
    table, block_rows, masks, kept_blocks, kept, dst, kv, layer_bases = _pooled_case(
        layers, heads, dim, torch.float64, kept_kind)
    in_place, into = kv.clone(), kv.clone()
    want = compact_pooled_rows_reference(in_place[..., :dim], in_place[..., dim:], table,
                                         block_rows, masks, layer_bases, kept_blocks)
    got = compact_pooled_rows_reference(into[..., :dim], into[..., dim:], table, block_rows,
                                        masks, layer_bases, kept_blocks, dst_blocks=dst)
    for name, g, w in zip(("page_start", "counts", "chunk_layer", "kept_blocks"), got, want,
                          strict=True):
        assert g.dtype == torch.int32 and torch.equal(g, w), name
    assert got[3].tolist() == kept
    bases = layer_bases.tolist()
    _assert_only_written_changed(kv, into, _sources(table, block_rows, bases),
                                 _written(dst, kept, bases))
    starts, counts, chunk_layer, _ = got
    for r, b in enumerate(block_rows):
        for k in range(layers):
            for h in range(heads):
                start, count = int(starts[r, k, h]), int(counts[r, k, h])
                got_kv = _pooled_tokens(into, dst[r], layer_bases, start, count,
                                        chunk_layer[r], kept[r])
                in_place_kv = _pooled_tokens(in_place, table[b], layer_bases, start, count,
                                             chunk_layer[r], kept[r])
                assert torch.equal(got_kv, in_place_kv)
                assert torch.equal(got_kv, _kept_tokens(kv, bases[k], table[b], h,
                                                        masks[r, k, h]))


def test_pooled_reference_pages_cross_into_other_layers_destinations():
    """The pooled test above is meaningful: some head's pages lie in another layer's
    tensor, at that layer's destination blocks."""
    layers, heads, dim = 4, 2, 8
    table, block_rows, masks, kept_blocks, kept, dst, kv, layer_bases = _pooled_case(
        layers, heads, dim, torch.float64, "none")
    starts, _, chunk_layer, _ = compact_pooled_reference(
        kv[..., :dim], kv[..., dim:], table[block_rows[0]], masks[0], layer_bases, None,
        dst_blocks=dst[0])
    first_chunk = (starts // (kept[0] * heads)).long()
    owner = chunk_layer.long()[first_chunk]
    assert (owner != torch.arange(layers)[:, None]).any()


def test_references_refuse_too_few_destinations():
    heads, dim = 2, 8
    table, block_rows, masks, kept, dst, kv = _rows_case(heads, dim, torch.float64, spare=0)
    with pytest.raises(RuntimeError, match="destination blocks"):
        compact_rows_reference(kv[..., :dim], kv[..., dim:], table, block_rows, masks, kept,
                               dst_blocks=dst[:, :max(kept) - 1])
    with pytest.raises(RuntimeError, match=r"\[R=3, W\]"):
        compact_rows_reference(kv[..., :dim], kv[..., dim:], table, block_rows, masks, kept,
                               dst_blocks=dst[:2])
    layers = 3
    table, block_rows, masks, kept_blocks, kept, dst, kv, layer_bases = _pooled_case(
        layers, heads, dim, torch.float64, "mixed")
    # Row 0 is measured (None): its count is known only after the masks are read.
    with pytest.raises(RuntimeError, match="destination blocks"):
        compact_pooled_rows_reference(kv[..., :dim], kv[..., dim:], table, block_rows, masks,
                                      layer_bases, [None] * 3, dst_blocks=dst[:, :kept[0] - 1])
    with pytest.raises(RuntimeError, match="destination blocks"):
        compact_pooled_reference(kv[..., :dim], kv[..., dim:], table[block_rows[1]],
                                 masks[1], layer_bases, kept[1],
                                 dst_blocks=dst[1, :kept[1] - 1])


E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3fn", "e5m2"])
@pytest.mark.parametrize("into", [False, True], ids=["in_place", "fresh"])
def test_references_move_fp8_values(dtype, into):
    """Own-layer and pooled references on an fp8 cache of random bytes move exactly what
    they move in a float64 copy of it (fp8 -> float64 is exact; NaN patterns too)."""
    heads, dim = 2, 16
    table, block_rows, masks, kept, dst, kv = _rows_case(heads, dim, dtype)
    wide = kv.to(torch.float64)
    dst_blocks = dst if into else None
    got = compact_rows_reference(kv[..., :dim], kv[..., dim:], table, block_rows, masks, kept,
                                 dst_blocks=dst_blocks)
    want = compact_rows_reference(wide[..., :dim], wide[..., dim:], table, block_rows, masks,
                                  kept, dst_blocks=dst_blocks)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    torch.testing.assert_close(kv.to(torch.float64), wide, rtol=0, atol=0, equal_nan=True)
    table, block_rows, masks, kept_blocks, kept, dst, kv, layer_bases = _pooled_case(
        3, heads, dim, dtype, "mixed")
    wide = kv.to(torch.float64)
    dst_blocks = dst if into else None
    got = compact_pooled_rows_reference(kv[..., :dim], kv[..., dim:], table, block_rows, masks,
                                        layer_bases, kept_blocks, dst_blocks=dst_blocks)
    want = compact_pooled_rows_reference(wide[..., :dim], wide[..., dim:], table, block_rows,
                                         masks, layer_bases, kept_blocks, dst_blocks=dst_blocks)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    torch.testing.assert_close(kv.to(torch.float64), wide, rtol=0, atol=0, equal_nan=True)


# Triton (interpreter) against the references.


def _dst_form(dst: torch.Tensor, form: str) -> torch.Tensor | None:
    """The destination table as a caller may pass it: int32 contiguous ("fresh"), int32
    columns of a wider table (row stride != W, "strided"), int64 ("int64"), or None (in
    place)."""
    if form == "in_place":
        return None
    if form == "int64":
        return dst.long()
    if form == "strided":
        wide = torch.full((dst.shape[0], dst.shape[1] + 5), -7, dtype=torch.int32)
        wide[:, 2:2 + dst.shape[1]] = dst
        assert wide[:, 2:2 + dst.shape[1]].stride() == (dst.shape[1] + 5, 1)
        return wide[:, 2:2 + dst.shape[1]]
    return dst


@pytest.mark.parametrize("dtype,heads,dim,form", [
    (torch.float32, 2, 64, "fresh"),
    (torch.bfloat16, 8, 32, "strided"),
    (torch.float16, 1, 16, "int64"),
    (torch.bfloat16, 2, 32, "in_place"),
    (E4M3, 2, 32, "fresh"),
    (E5M2, 8, 16, "strided"),
    (E4M3, 4, 64, "in_place"),
    (torch.uint8, 1, 16, "int64"),
])
def test_triton_rows_into_fresh_blocks_match_reference(dtype, heads, dim, form):
    from vllm_adakv.kernels.triton_compaction import compact_rows_triton

    table, block_rows, masks, kept, dst, kv = _rows_case(heads, dim, dtype)
    dst_blocks = _dst_form(dst, form)
    want_kv = kv.clone()
    want = compact_rows_reference(want_kv[..., :dim], want_kv[..., dim:], table, block_rows,
                                  masks, kept, dst_blocks=dst_blocks)
    got = compact_rows_triton(kv[..., :dim], kv[..., dim:], table, block_rows, masks, kept,
                              dst_blocks=dst_blocks)
    for name, g, w in zip(("page_start", "counts"), got, want, strict=True):
        assert g.dtype == torch.int32 and torch.equal(g, w), name
    assert torch.equal(kv.view(torch.uint8), want_kv.view(torch.uint8)), \
        "caches differ after compaction (exact copy expected)"


@pytest.mark.parametrize("dtype,heads,dim,kept_kind,fused,form", [
    (torch.float32, 2, 32, "mixed", True, "fresh"),
    (torch.bfloat16, 4, 64, "given", True, "strided"),
    (torch.float16, 1, 16, "none", True, "int64"),
    (torch.float32, 2, 16, "none", False, "strided"),
    (torch.bfloat16, 8, 16, "mixed", True, "fresh"),
    (torch.float16, 2, 16, "mixed", True, "in_place"),
    (torch.float32, 2, 16, "mixed", False, "in_place"),
    (E4M3, 4, 64, "given", True, "fresh"),
    (E5M2, 2, 16, "mixed", False, "in_place"),
    (E4M3, 8, 16, "none", True, "strided"),
    (torch.uint8, 2, 32, "mixed", True, "in_place"),
])
def test_triton_pooled_rows_into_fresh_blocks_match_reference(dtype, heads, dim, kept_kind,
                                                              fused, form, monkeypatch):
    """``fused``: one launch per pass (double scratch), else two (``_FUSED_SCRATCH_BYTES``
    forced to 0, the large-scratch path)."""
    from vllm_adakv.kernels import triton_compaction

    if not fused:
        monkeypatch.setattr(triton_compaction, "_FUSED_SCRATCH_BYTES", 0)
    layers = 4
    table, block_rows, masks, kept_blocks, kept, dst, kv, layer_bases = _pooled_case(
        layers, heads, dim, dtype, kept_kind)
    dst_blocks = _dst_form(dst, form)
    assert_pooled_triton_matches_reference(kv, dim, table, block_rows, masks, layer_bases,
                                           kept_blocks, dst_blocks)


def test_triton_refuses_too_few_destinations():
    from vllm_adakv.kernels.triton_compaction import (
        compact_pooled_rows_triton,
        compact_rows_triton,
    )

    heads, dim = 2, 16
    table, block_rows, masks, kept, dst, kv = _rows_case(heads, dim, torch.float32, spare=0)
    with pytest.raises(RuntimeError, match="destination blocks"):
        compact_rows_triton(kv[..., :dim], kv[..., dim:], table, block_rows, masks, kept,
                            dst_blocks=dst[:, :max(kept) - 1])
    table, block_rows, masks, kept_blocks, kept, dst, kv, layer_bases = _pooled_case(
        3, heads, dim, torch.float32, "mixed")
    # A planned row (checked on the host) and a measured one (checked after the plan).
    with pytest.raises(RuntimeError, match="destination blocks"):
        compact_pooled_rows_triton(kv[..., :dim], kv[..., dim:], table, block_rows, masks,
                                   layer_bases, kept_blocks, dst_blocks=dst[:, :kept[1] - 1])
    with pytest.raises(RuntimeError, match="row 0 needs .* destination blocks"):
        compact_pooled_rows_triton(kv[..., :dim], kv[..., dim:], table, block_rows, masks,
                                   layer_bases, [None] * 3, dst_blocks=dst[:, :kept[0] - 1])
