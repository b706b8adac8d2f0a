"""Triton head-wise decode (run by the Triton interpreter on CPU) == the torch reference.

Inputs are real compacted caches (``compact_reference``) with uneven per-head page
counts plus a tail of generated tokens. Slots the kernel must not read (past a
head's kept count in its last page, prompt slots of the tail block before the
tail) are poisoned with NaN after the reference ran, and ``out`` is poisoned
before the call. Tolerances: fp32 rtol/atol 1e-4; bf16/fp16 inputs rtol/atol
2e-2 against the fp32 reference computed on the same rounded inputs.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from tests.kernels.paged_cache import random_block_tables, write_tokens  # noqa: E402
from vllm_adakv.kernels import compact_reference, headwise_attention_reference  # noqa: E402
from vllm_adakv.kernels.triton_decode import headwise_attention_triton  # noqa: E402

BLOCK_SIZE = 16
WINDOW = 8


def _keep_mask(heads: int, length: int, empty_head: int | None) -> torch.Tensor:
    """Uneven per-head kept sets, window kept; ``empty_head`` keeps nothing at all."""
    mask = torch.zeros(heads, length, dtype=torch.bool)
    for h in range(heads):
        n = int(torch.randint(0, length - WINDOW + 1, ()).item())
        mask[h, torch.randperm(length - WINDOW)[:n]] = True
    mask[:, length - WINDOW :] = True
    if empty_head is not None:
        mask[empty_head] = False
    return mask


def _kv_caches(nblocks: int, heads: int, dim: int, dtype: torch.dtype, transposed: bool):
    if not transposed:
        return (torch.randn(nblocks, heads, BLOCK_SIZE, dim).to(dtype),
                torch.randn(nblocks, heads, BLOCK_SIZE, dim).to(dtype))
    # vLLM CPU layout: one head-page = bs keys (stored [D, bs]) then bs values.
    kv = torch.randn(nblocks, heads, 2 * BLOCK_SIZE, dim).to(dtype)
    key_cache = torch.as_strided(
        kv, (nblocks, heads, BLOCK_SIZE, dim), (kv.stride(0), kv.stride(1), 1, BLOCK_SIZE),
        kv.storage_offset(),
    )
    return key_cache, kv[:, :, BLOCK_SIZE:]


def _build(group, dim, dtype, q_lens, transposed=False, empty_head=None, pad_tokens=0):
    heads = 4 if group < 8 else 2
    rows = len(q_lens)
    lengths = [int(x) for x in torch.randint(40, 130, (rows,))]
    tails = [max(int(torch.randint(1, 20, ())), q, 1) for q in q_lens]
    seq = [n + t for n, t in zip(lengths, tails, strict=True)]
    table, nblocks = random_block_tables(seq, BLOCK_SIZE)
    kc, vc = _kv_caches(nblocks, heads, dim, dtype, transposed)
    tables, counts = [], []
    for r, (n, t) in enumerate(zip(lengths, tails, strict=True)):
        write_tokens(kc, vc, table[r], torch.arange(n), torch.randn(n, heads, dim).to(dtype),
                     torch.randn(n, heads, dim).to(dtype))
        keep = _keep_mask(heads, n, empty_head if r == 0 else None)
        kept_blocks = n // BLOCK_SIZE
        need = int(((keep.sum(1) + BLOCK_SIZE - 1) // BLOCK_SIZE).sum())
        if need > kept_blocks * heads:
            keep[:, : n - WINDOW] = False  # keep only the window: always fits
        pt, cnt = compact_reference(kc, vc, table[r], keep, kept_blocks)
        write_tokens(kc, vc, table[r], torch.arange(n, n + t),
                     torch.randn(t, heads, dim).to(dtype), torch.randn(t, heads, dim).to(dtype))
        tables.append(pt)
        counts.append(cnt)
    max_pages = max(p.shape[1] for p in tables)
    page_table = torch.full((rows, heads, max_pages), -1, dtype=torch.int32)
    for r, p in enumerate(tables):
        page_table[r, :, : p.shape[1]] = p
    num_tokens = sum(q_lens)
    query = torch.randn(num_tokens + pad_tokens, heads * group, dim).to(dtype)
    qsl = torch.tensor([0, *torch.cumsum(torch.tensor(q_lens), 0).tolist()], dtype=torch.int32)
    return dict(
        query=query, key_cache=kc, value_cache=vc, page_table=page_table,
        kept_counts=torch.stack(counts), block_table=table,
        tail_start=torch.tensor(lengths, dtype=torch.int32),
        seq_lens=torch.tensor(seq, dtype=torch.int32), query_start_loc=qsl,
        scale=dim**-0.5,
    )


def _poison_unread(args) -> None:
    """NaN into cache slots the kernel must not read."""
    kc, vc = args["key_cache"], args["value_cache"]
    heads = kc.shape[1]
    for r in range(args["page_table"].shape[0]):
        for h in range(heads):
            cnt = int(args["kept_counts"][r, h])
            if cnt % BLOCK_SIZE:
                page = int(args["page_table"][r, h, cnt // BLOCK_SIZE])
                kc[page // heads, page % heads, cnt % BLOCK_SIZE :] = float("nan")
                vc[page // heads, page % heads, cnt % BLOCK_SIZE :] = float("nan")
        tail = int(args["tail_start"][r])
        block = int(args["block_table"][r, tail // BLOCK_SIZE])
        kc[block, :, : tail % BLOCK_SIZE] = float("nan")
        vc[block, :, : tail % BLOCK_SIZE] = float("nan")


def _check(args, num_splits, atol, rtol, pad_tokens=0, pages_per_iter=None, split_tokens=None):
    query = args["query"]
    want = torch.full(query.shape, float("nan"), dtype=torch.float32)
    headwise_attention_reference(**args, out=want)
    _poison_unread(args)
    out = torch.full_like(query, float("nan"))
    got = headwise_attention_triton(**args, out=out, num_splits=num_splits,
                                    pages_per_iter=pages_per_iter, split_tokens=split_tokens)
    assert got is out
    n = query.shape[0] - pad_tokens
    assert not torch.isnan(out[:n]).any(), "output not fully written"
    assert torch.isnan(out[n:]).all(), "padding tokens must be left untouched"
    torch.testing.assert_close(out[:n].float(), want[:n], atol=atol, rtol=rtol)


@pytest.mark.parametrize("pages_per_iter", [1, 4])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_fp32_matches_reference(group, dim, pages_per_iter):
    """One head-page per loop iteration, and tiles of 4 (pages of a head, or tail blocks,
    that straddle a tile's end are masked)."""
    num_splits = 1 if dim == 64 else 3
    args = _build(group, dim, torch.float32, [1, 3, 1])
    _check(args, num_splits, atol=1e-4, rtol=1e-4, pages_per_iter=pages_per_iter)


@pytest.mark.parametrize("num_splits", [1, 4, None])
def test_transposed_key_view(num_splits):
    args = _build(4, 64, torch.float32, [1, 1, 3], transposed=True)
    assert args["key_cache"].stride(2) == 1
    _check(args, num_splits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_low_precision(dtype, num_splits):
    args = _build(4, 64, dtype, [1, 3], transposed=True)
    _check(args, num_splits, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("pages_per_iter", [1, 2])
@pytest.mark.parametrize("num_splits", [1, 5])
def test_head_without_kept_tokens_and_padding(num_splits, pages_per_iter):
    """Row 0 has a head with no kept token (the tail only), row 1 has no query
    token at all, and two padding tokens past query_start_loc[-1] stay untouched."""
    args = _build(8, 128, torch.float32, [3, 0, 1], empty_head=1, pad_tokens=2)
    assert int(args["kept_counts"][0, 1]) == 0
    _check(args, num_splits, atol=1e-4, rtol=1e-4, pad_tokens=2, pages_per_iter=pages_per_iter)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("split_tokens", "pages_per_iter"), [(16, 1), (40, 2), (100_000, 2)])
def test_splits_by_tokens(split_tokens, pages_per_iter, dtype):
    """Splits of a fixed number of keys: long heads span several splits, short heads
    leave splits empty, an empty head none at all; one huge split is one program."""
    args = _build(4, 64, dtype, [1, 2, 1], empty_head=1)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    _check(args, None, atol=tol, rtol=tol, pages_per_iter=pages_per_iter,
           split_tokens=split_tokens)


def test_splits_by_tokens_cover_the_longest_sequence():
    """The grid always covers the bound, also where the split cap makes splits grow."""
    from vllm_adakv.kernels.triton_decode import _MAX_SPLITS, splits_by_tokens

    for tokens, bs, pages, max_pages in [(16, 16, 1, 10), (128, 16, 8, 2049), (1, 16, 8, 9999),
                                         (1024, 32, 4, 3)]:
        splits, per_split = splits_by_tokens(tokens, bs, pages, max_pages)
        bound = -(-max_pages // pages) + 1
        assert 1 <= splits <= _MAX_SPLITS and splits * per_split >= bound
        assert per_split >= -(-tokens // (bs * pages))
    with pytest.raises(ValueError, match="split_tokens"):
        splits_by_tokens(0, 16, 8, 10)


def test_decode_only_batch_default_splits():
    args = _build(1, 64, torch.float32, [1, 1, 1])
    _check(args, None, atol=1e-4, rtol=1e-4)
