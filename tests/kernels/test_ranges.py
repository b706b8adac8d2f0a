"""Pages as ranges: compaction and the row-indexed head-wise decode.

``compact_ranges_reference`` must describe exactly the pages ``compact_reference``
lists; the range decode (torch reference and Triton under the interpreter) must
equal the page-table reference for rows picked out of a larger batch in any
order, with their page/count tables at arbitrary slots, and must leave every
other token of ``out`` untouched (poisoned with NaN before the call).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from tests.kernels.oracles import (  # noqa: E402
    assign_head_pages,
    compact_ranges_triton,
    compact_reference,
    headwise_attention_reference,
)
from tests.kernels.paged_cache import random_block_tables, write_tokens  # noqa: E402
from vllm_adakv.kernels import (  # noqa: E402
    compact_ranges_reference,
    headwise_attention_ranges_reference,
)
from vllm_adakv.kernels.decode import row_table  # noqa: E402
from vllm_adakv.kernels.triton_decode import (  # noqa: E402
    headwise_attention_ranges_triton,
)

BS = 16
WINDOW = 8


def _random_keep(heads: int, length: int, kept_blocks: int) -> torch.Tensor:
    while True:
        keep = torch.rand(heads, length) < torch.rand(heads, 1)
        keep[:, length - WINDOW :] = True
        if int(((keep.sum(1) + BS - 1) // BS).sum()) <= kept_blocks * heads:
            return keep


def test_ranges_describe_the_same_pages():
    heads, dim, length = 4, 32, 150
    table, nb = random_block_tables([length], BS)
    kc, vc = torch.randn(nb, heads, BS, dim), torch.randn(nb, heads, BS, dim)
    keep = _random_keep(heads, length, length // BS)
    k2, v2 = kc.clone(), vc.clone()
    start, counts = compact_ranges_reference(kc, vc, table[0], keep, length // BS)
    pt, counts2 = compact_reference(k2, v2, table[0], keep, length // BS)
    assert torch.equal(kc, k2) and torch.equal(vc, v2)
    assert torch.equal(counts, counts2) and torch.equal(counts, keep.sum(1).int())
    want_pt, offset = assign_head_pages(counts, table[0], heads, BS)
    assert torch.equal(start.long(), offset) and torch.equal(pt, want_pt)


def _batch(group: int, dim: int, dtype: torch.dtype):
    heads = 2
    batch = 5
    lengths = [int(x) for x in torch.randint(40, 130, (batch,))]
    q_lens = [1, 3, 2, 1, 4]
    seq = [n + int(torch.randint(q, q + 10, ())) for n, q in zip(lengths, q_lens, strict=True)]
    table, nb = random_block_tables(seq, BS)
    kc = torch.randn(nb, heads, BS, dim).to(dtype)
    vc = torch.randn(nb, heads, BS, dim).to(dtype)
    num_slots = 7
    starts = torch.zeros(num_slots, heads, dtype=torch.int32)
    counts = torch.zeros(num_slots, heads, dtype=torch.int32)
    slots = torch.randperm(num_slots)[:batch]
    for b in range(batch):
        n = lengths[b]
        write_tokens(kc, vc, table[b], torch.arange(seq[b]),
                     torch.randn(seq[b], heads, dim).to(dtype),
                     torch.randn(seq[b], heads, dim).to(dtype))
        st, cn = compact_ranges_reference(kc, vc, table[b], _random_keep(heads, n, n // BS),
                                          n // BS)
        starts[slots[b]], counts[slots[b]] = st, cn
    qsl = torch.tensor([0, *torch.cumsum(torch.tensor(q_lens), 0).tolist()], dtype=torch.int32)
    query = torch.randn(int(qsl[-1]) + 2, heads * group, dim).to(dtype)
    picked = torch.tensor([3, 0, 1])  # a subset of the batch, out of order
    rows = row_table(picked, slots[picked], qsl[picked], qsl[picked + 1],
                     torch.tensor(lengths)[picked], torch.tensor(seq)[picked])
    return dict(query=query, key_cache=kc, value_cache=vc, page_start=starts,
                kept_counts=counts, block_table=table, rows=rows,
                num_row_tokens=int((qsl[picked + 1] - qsl[picked]).sum()), scale=dim**-0.5)


def _page_table_reference(args) -> torch.Tensor:
    """Same rows through the page-table reference, one row at a time."""
    want = torch.full(args["query"].shape, float("nan"))
    for b, s, q0, q1, tail, seq, _ in args["rows"].tolist():
        pt, _ = assign_head_pages(args["kept_counts"][s], args["block_table"][b],
                                  args["key_cache"].shape[1], BS)
        headwise_attention_reference(
            args["query"], args["key_cache"], args["value_cache"], pt[None],
            args["kept_counts"][s][None], args["block_table"][b][None], torch.tensor([tail]),
            torch.tensor([seq]), torch.tensor([q0, q1]), args["scale"], want)
    return want


def _written(rows: torch.Tensor, num_tokens: int) -> torch.Tensor:
    mask = torch.zeros(num_tokens, dtype=torch.bool)
    for _, _, q0, q1, *_ in rows.tolist():
        mask[q0:q1] = True
    return mask


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("pages_per_iter", [1, None])
@pytest.mark.parametrize("group,dim,num_splits", [(1, 64, 1), (4, 128, 3), (8, 64, None)])
def test_range_decode_matches_page_tables(impl, group, dim, num_splits, pages_per_iter):
    args = _batch(group, dim, torch.float32)
    want = _page_table_reference(args)
    out = torch.full_like(args["query"], float("nan"))
    if impl == "reference":
        headwise_attention_ranges_reference(**args, out=out)
    else:
        headwise_attention_ranges_triton(**args, out=out, num_splits=num_splits,
                                         pages_per_iter=pages_per_iter)
    written = _written(args["rows"], out.shape[0])
    assert not torch.isnan(out[written]).any(), "row tokens not fully written"
    assert torch.isnan(out[~written]).all(), "tokens of other rows must be left untouched"
    torch.testing.assert_close(out[written], want[written], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options", [{"balance_splits": 4, "balance_min_iters": 1},
                                     {"balance_splits": 2, "balance_min_iters": 2}])
def test_range_decode_split_options(options):
    """Splits balanced over a row's heads, over the range tables (rows picked out of a
    batch in any order), give the same output."""
    args = _batch(4, 64, torch.float32)
    want = _page_table_reference(args)
    out = torch.full_like(args["query"], float("nan"))
    headwise_attention_ranges_triton(**args, out=out, pages_per_iter=1, **options)
    written = _written(args["rows"], out.shape[0])
    assert not torch.isnan(out[written]).any(), "row tokens not fully written"
    assert torch.isnan(out[~written]).all(), "tokens of other rows must be left untouched"
    torch.testing.assert_close(out[written], want[written], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_range_decode_low_precision(dtype):
    args = _batch(4, 64, dtype)
    want = _page_table_reference(args)
    out = torch.full_like(args["query"], float("nan"))
    headwise_attention_ranges_triton(**args, out=out, num_splits=2)
    written = _written(args["rows"], out.shape[0])
    torch.testing.assert_close(out[written].float(), want[written], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,dim", [(2, 64), (8, 128)])
def test_triton_compaction_matches_reference(dtype, heads, dim):
    length = int(torch.randint(100, 300, ()).item())
    table, nb = random_block_tables([length], BS)
    kv = torch.randn(nb, heads, BS, 2 * dim).to(dtype)  # keys then values per token
    kc, vc = kv[..., :dim], kv[..., dim:]
    keep = _random_keep(heads, length, length // BS)
    keep[0, : length - WINDOW] = False  # one head keeps only the window
    want_kv = kv.clone()
    want = compact_ranges_reference(want_kv[..., :dim], want_kv[..., dim:], table[0], keep,
                                    length // BS)
    got = compact_ranges_triton(kc, vc, table[0], keep, length // BS)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(kv, want_kv), "caches differ after compaction (exact copy expected)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_compaction_rows_match_reference(dtype):
    """Several requests in one launch set: rows of a shared block table in shuffled order,
    different lengths, each with exactly the blocks its pages need (tight capacity)."""
    from vllm_adakv.kernels.compaction import compact_rows_reference
    from vllm_adakv.kernels.triton_compaction import compact_rows_triton

    heads, dim = 4, 64
    lengths = [int(torch.randint(40, 260, ())) for _ in range(4)]
    table, nb = random_block_tables(lengths, BS)
    kv = torch.randn(nb, heads, BS, 2 * dim).to(dtype)
    masks = torch.zeros(len(lengths), heads, max(lengths), dtype=torch.bool)
    order = [3, 1, 0, 2]
    kept = []
    for r, b in enumerate(order):
        keep = _random_keep(heads, lengths[b], lengths[b] // BS)
        if r == 1:
            keep[2, : lengths[b] - WINDOW] = False  # a head keeping only the window
        masks[r, :, : lengths[b]] = keep
        pages = int(((keep.sum(1) + BS - 1) // BS).sum())
        kept.append(-(-pages // heads))
    want_kv = kv.clone()
    want = compact_rows_reference(want_kv[..., :dim], want_kv[..., dim:], table, order, masks,
                                  kept)
    got = compact_rows_triton(kv[..., :dim], kv[..., dim:], table, order, masks, kept)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(kv, want_kv), "caches differ after compaction (exact copy expected)"


def test_triton_compaction_refuses_overflow():
    table, nb = random_block_tables([100], BS)
    kv = torch.randn(nb, 2, BS, 64)
    keep = torch.ones(2, 100, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="head-pages more"):
        compact_ranges_triton(kv[..., :32], kv[..., 32:], table[0], keep, kept_blocks=3)
