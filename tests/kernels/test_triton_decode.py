"""Triton head-wise decode (run by the Triton interpreter on CPU) == the torch reference.

Inputs are real compacted caches (``compact_reference``) with uneven per-head page
counts plus a tail of generated tokens; the reference reads the page tables, the kernel
the same pages as ranges (``_triton``). Slots the kernel must not read (past a
head's kept count in its last page, prompt slots of the tail block before the
tail) are poisoned with NaN after the reference ran, and ``out`` is poisoned
before the call; the split-K scratch is filled with NaN (a partial read but never
written would show). Tolerances: fp32 rtol/atol 1e-4; bf16/fp16 inputs rtol/atol
2e-2 against the fp32 reference computed on the same rounded inputs. fp8 caches (random
scales): the reference and the kernel against the float64 reference on the dequantized
caches (fp8 -> float64 * scale), at those tolerances by query dtype.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from tests.kernels.oracles import compact_reference, headwise_attention_reference  # noqa: E402
from tests.kernels.paged_cache import random_block_tables, write_tokens  # noqa: E402
from vllm_adakv.kernels import pooled_page_table, triton_decode  # noqa: E402
from vllm_adakv.kernels.decode import (  # noqa: E402
    headwise_attention_ranges_reference,
    masked_prompt_attention_reference,
    row_table,
)
from vllm_adakv.kernels.triton_decode import (  # noqa: E402
    headwise_attention_ranges_triton,
)

BLOCK_SIZE = 16
WINDOW = 8


@pytest.fixture(autouse=True)
def nan_scratch(monkeypatch) -> list[torch.Tensor]:
    """Split-K scratch full of NaN: combining a partial no program wrote gives NaN. Returns
    the list of scratch tensors allocated (max, sum, acc per launch)."""
    made = []

    def scratch(*shape, device):
        made.append(torch.full(shape, float("nan"), dtype=torch.float32, device=device))
        return made[-1]

    monkeypatch.setattr(triton_decode, "_scratch", scratch)
    return made


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


def _build(group, dim, dtype, q_lens, transposed=False, empty_head=None, pad_tokens=0,
           keep_fn=None, lengths=None):
    """Rows of ``q_lens`` query tokens over compacted prompts of ``lengths`` tokens
    (default: random) plus a tail; ``keep_fn(r, heads, n)`` gives row r's keep mask
    (default: ``_keep_mask``)."""
    heads = 4 if group < 8 else 2
    rows = len(q_lens)
    if lengths is None:
        lengths = [int(x) for x in torch.randint(40, 130, (rows,))]
    tails = [max(int(torch.randint(1, 20, ())), q, 1) for q in q_lens]
    seq = [n + t for n, t in zip(lengths, tails, strict=True)]
    table, nblocks = random_block_tables(seq, BLOCK_SIZE)
    kc, vc = _kv_caches(nblocks, heads, dim, dtype, transposed)
    tables, counts = [], []
    for r, (n, t) in enumerate(zip(lengths, tails, strict=True)):
        write_tokens(kc, vc, table[r], torch.arange(n), torch.randn(n, heads, dim).to(dtype),
                     torch.randn(n, heads, dim).to(dtype))
        keep = (keep_fn(r, heads, n) if keep_fn is not None
                else _keep_mask(heads, n, empty_head if r == 0 else None))
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


def _triton(args, out, impl=headwise_attention_ranges_triton, **options):
    """The range decode (what the engine runs; ``impl``: or its reference) on a page-table
    batch: ``compact_reference`` gives each head the pages after those of the heads before
    it in its row's head-page sequence, so row r is slot r with ``page_start`` the pages
    of the heads before h."""
    counts = args["kept_counts"]
    pages = (counts.long() + BLOCK_SIZE - 1) // BLOCK_SIZE
    starts = (pages.cumsum(1) - pages).int()
    heads = args["page_table"].shape[1]
    for r in range(counts.shape[0]):
        table = pooled_page_table(starts[r], counts[r], args["block_table"][r], heads,
                                  BLOCK_SIZE)
        assert torch.equal(table, args["page_table"][r, :, : table.shape[1]])
        assert (args["page_table"][r, :, table.shape[1] :] == -1).all()
    qsl = args["query_start_loc"]
    idx = torch.arange(counts.shape[0])
    rows = row_table(idx, idx, qsl[:-1], qsl[1:], args["tail_start"], args["seq_lens"])
    return impl(
        args["query"], args["key_cache"], args["value_cache"], starts, counts,
        args["block_table"], rows, int(qsl[-1]), args["scale"], out, **options)


def _check(args, num_splits, atol, rtol, pad_tokens=0, pages_per_iter=None, **options):
    query = args["query"]
    want = torch.full(query.shape, float("nan"), dtype=torch.float32)
    headwise_attention_reference(**args, out=want)
    _poison_unread(args)
    out = torch.full_like(query, float("nan"))
    got = _triton(args, out, num_splits=num_splits, pages_per_iter=pages_per_iter, **options)
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


def test_decode_only_batch_default_splits():
    args = _build(1, 64, torch.float32, [1, 1, 1])
    _check(args, None, atol=1e-4, rtol=1e-4)


# Balanced splits: each head of a row takes as many of the grid's splits as it needs to
# hold no more than the row's mean iterations per head.


def _balanced_k_used(args, r, pages_per_iter, splits, min_iters) -> list[int]:
    """Splits per head of row r in balanced mode (the kernel's formula, in Python)."""
    def cdiv(a, b):
        return -(-a // b)

    tail, seq = int(args["tail_start"][r]), int(args["seq_lens"][r])
    n_tail = max(cdiv(seq, BLOCK_SIZE) - tail // BLOCK_SIZE, 0) if seq > tail else 0
    iters = [cdiv(cdiv(int(c), BLOCK_SIZE), pages_per_iter) + cdiv(n_tail, pages_per_iter)
             for c in args["kept_counts"][r]]
    target = max(cdiv(sum(iters), len(iters)), min_iters)
    return [min(splits, max(1, cdiv(n, target))) for n in iters]


def _uneven_keep(r: int, heads: int, length: int) -> torch.Tensor:
    """Very uneven heads: one keeps nothing (even rows) or one token (odd rows), one
    all but one token, the others up to a quarter; which head is which varies by row."""
    counts = [int(torch.randint(0, length // 4 + 1, ())) for _ in range(heads)]
    order = torch.randperm(heads).tolist()
    counts[order[0]] = r % 2
    counts[order[1]] = length - 1
    keep = torch.zeros(heads, length, dtype=torch.bool)
    for h, n in enumerate(counts):
        keep[h, torch.randperm(length)[:n]] = True
    return keep


def _check_balanced(args, scratch, splits, min_iters, pages_per_iter, tol, pad_tokens=0,
                    **options) -> list:
    """Output == reference, and exactly the partials of heads on several splits, from
    their first k_used splits, were written (heads on one split write out directly)."""
    k_used = [_balanced_k_used(args, r, pages_per_iter, splits, min_iters)
              for r in range(args["page_table"].shape[0])]
    _check(args, None, atol=tol, rtol=tol, pad_tokens=pad_tokens, pages_per_iter=pages_per_iter,
           balance_splits=splits, balance_min_iters=min_iters, **options)
    if splits > 1:
        mid_m = scratch[0]  # [tokens, q heads, splits]: a token's scratch row is its index
        heads = args["key_cache"].shape[1]
        group = mid_m.shape[1] // heads
        want = torch.zeros(mid_m.shape, dtype=torch.bool)
        qsl = args["query_start_loc"].tolist()
        for r, k in enumerate(k_used):
            for h, used in enumerate(k):
                if used > 1:
                    want[qsl[r] : qsl[r + 1], h * group : (h + 1) * group, :used] = True
        assert torch.equal(~torch.isnan(mid_m), want), "partials written != k_used"
    else:
        assert not scratch, "one split needs no scratch"
    return k_used


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_balanced_matches_reference(group, dim, nan_scratch):
    """Uneven heads (empty, one token, nearly all), rows of 1 and 3 query tokens, each
    with a tail: long heads over several splits, short ones on one, in the same row."""
    args = _build(group, dim, torch.float32, [1, 3, 1], keep_fn=_uneven_keep)
    counts = args["kept_counts"]
    assert (counts == 0).any() and (counts == 1).any()
    k_used = _check_balanced(args, nan_scratch, splits=4, min_iters=1, pages_per_iter=1,
                             tol=1e-4)
    assert all(min(k) == 1 and max(k) > 1 for k in k_used), k_used


@pytest.mark.parametrize(("splits", "min_iters", "pages_per_iter"),
                         [(2, 1, 1), (8, 1, 2), (4, 64, 1), (1, 1, 1)])
def test_balanced_grid_and_minimum(splits, min_iters, pages_per_iter, nan_scratch):
    """A grid too small for the longest head (capped at 2 splits), one larger than any
    head needs (8: idle splits), a minimum that keeps every head here on one split (the
    reduce must leave out alone), and a one-split grid (the plain kernel)."""
    args = _build(4, 64, torch.float32, [2, 1], keep_fn=_uneven_keep)
    k_used = _check_balanced(args, nan_scratch, splits, min_iters, pages_per_iter, tol=1e-4)
    if splits == 2:
        assert max(max(k) for k in k_used) == 2
    if splits == 8:
        assert max(max(k) for k in k_used) < 8
    if min_iters == 64:
        assert max(max(k) for k in k_used) == 1


def test_balanced_one_and_several_splits_in_a_row(nan_scratch):
    """Row 0: a head on a single split (written by the forward) next to one on three or
    more (partials combined by the reduce: first, middle and last splits), the others
    empty; row 1 without query tokens; padding tokens past the last row untouched."""
    def keep_fn(r, heads, length):
        keep = torch.zeros(heads, length, dtype=torch.bool)
        keep[0, : length - 1] = True  # nearly everything
        keep[1, 5] = True  # one token
        return keep

    args = _build(4, 64, torch.float32, [3, 0, 1], keep_fn=keep_fn, pad_tokens=2,
                  lengths=[250, 60, 70])
    k_used = _check_balanced(args, nan_scratch, splits=8, min_iters=1, pages_per_iter=1,
                             tol=1e-4, pad_tokens=2)
    assert k_used[0][1] == 1 and k_used[0][0] >= 3, k_used


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_balanced_low_precision(dtype, nan_scratch):
    args = _build(4, 128, dtype, [1, 3], transposed=True, keep_fn=_uneven_keep)
    k_used = _check_balanced(args, nan_scratch, splits=4, min_iters=1, pages_per_iter=1,
                             tol=2e-2)
    assert any(max(k) > 1 for k in k_used)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_balanced_pooled(dtype):
    """Head-pages pooled across layers (chunk tables), every layer of the batch."""
    from tests.kernels.test_pooling import _check_pooled_decode, _pooled_decode_batch

    x = _pooled_decode_batch(4, 64, dtype)
    _check_pooled_decode(x, 1e-4 if dtype == torch.float32 else 2e-2, pages_per_iter=1,
                         balance_splits=4, balance_min_iters=1)


def test_balance_arguments():
    args = _build(1, 64, torch.float32, [1])
    out = torch.empty_like(args["query"])
    with pytest.raises(ValueError, match="balance_splits replaces"):
        _triton(args, out, balance_splits=2, num_splits=2)
    for value in [0, 65, 2.0, True]:
        with pytest.raises(ValueError, match="balance_splits must be"):
            _triton(args, out, balance_splits=value)
    for value in [0, 1.5]:
        with pytest.raises(ValueError, match="balance_min_iters must be"):
            _triton(args, out, balance_splits=2, balance_min_iters=value)


def test_default_balances_where_one_split_programs_fill_the_sms_up_to_four_times(monkeypatch):
    from vllm_adakv.kernels.triton_decode import (
        BALANCE_MAX_WAVES,
        DEFAULT_BALANCE_SPLITS,
        default_balance_splits,
    )

    cpu = torch.device("cpu")
    monkeypatch.setattr(triton_decode, "sm_count", lambda device: 132)
    assert default_balance_splits(16, 8, cpu) is None  # 128 programs: split-K instead
    assert default_balance_splits(17, 8, cpu) == DEFAULT_BALANCE_SPLITS
    assert default_balance_splits(32, 8, cpu) == DEFAULT_BALANCE_SPLITS
    assert default_balance_splits(BALANCE_MAX_WAVES * 132 // 8, 8, cpu) is None
    assert default_balance_splits(128, 8, cpu) is None


def test_default_decode_takes_the_balanced_kernel(monkeypatch, nan_scratch):
    """With the SM count at the (row, head) programs' number, the default launch is the
    balanced one (a DEFAULT_BALANCE_SPLITS grid): the reference's output, and exactly the
    partials balanced mode writes."""
    from vllm_adakv.kernels.triton_decode import BALANCE_MIN_ITERS, DEFAULT_BALANCE_SPLITS

    args = _build(4, 64, torch.float32, [1, 1, 1], keep_fn=_uneven_keep,
                  lengths=[128, 128, 128])
    rows, heads = args["page_table"].shape[:2]
    monkeypatch.setattr(triton_decode, "sm_count", lambda device: rows * heads)
    k_used = [_balanced_k_used(args, r, 1, DEFAULT_BALANCE_SPLITS, BALANCE_MIN_ITERS)
              for r in range(rows)]
    _check(args, None, atol=1e-4, rtol=1e-4, pages_per_iter=1)
    assert nan_scratch and nan_scratch[0].shape[-1] == DEFAULT_BALANCE_SPLITS
    assert any(max(k) > 1 for k in k_used), k_used
    assert (~torch.isnan(nan_scratch[0])).any()


# fp8 caches (vLLM's --kv-cache-dtype fp8): element = fp8 value * k_scale (keys) or
# v_scale (values), one float32 scale each per layer.

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def _dequantized(args, k_scale, v_scale) -> dict:
    """The batch in float64: queries, and caches as the fp8 values times their scales."""
    return dict(args, query=args["query"].double(),
                key_cache=args["key_cache"].double() * k_scale.double(),
                value_cache=args["value_cache"].double() * v_scale.double())


def _check_fp8(args, tol, pad_tokens=0, **options):
    """The range reference (fp32) and the kernel on the fp8 batch == the float64 page-table
    reference on its dequantized caches; the reference at fp32 tolerance, the kernel at
    ``tol``. Unread slots poisoned and ``out`` NaN-filled as in ``_check``."""
    from tests.kernels.test_triton_scoring import fp8_scale

    k_scale, v_scale = fp8_scale(), fp8_scale()
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    query = args["query"]
    want = torch.full(query.shape, float("nan"), dtype=torch.float64)
    headwise_attention_reference(**_dequantized(args, k_scale, v_scale), out=want)
    n = query.shape[0] - pad_tokens
    ref = _triton(args, torch.full(query.shape, float("nan")),  # fp32: no output rounding
                  impl=headwise_attention_ranges_reference, **scales)
    torch.testing.assert_close(ref[:n].double(), want[:n], atol=1e-4, rtol=1e-4)
    _poison_unread(args)
    out = torch.full_like(query, float("nan"))
    got = _triton(args, out, **scales, **options)
    assert got is out
    assert not torch.isnan(out[:n]).any(), "output not fully written"
    assert torch.isnan(out[n:]).all(), "padding tokens must be left untouched"
    torch.testing.assert_close(out[:n].double(), want[:n], atol=tol, rtol=tol)


def _fp8_batch(group, dim, fp8, q_dtype, q_lens, **build):
    """``_build`` with fp8 caches and fresh queries of ``q_dtype``."""
    args = _build(group, dim, fp8, q_lens, **build)
    assert args["key_cache"].dtype == fp8
    args["query"] = torch.randn(args["query"].shape).to(q_dtype)
    return args


# Launch options per GQA group: one split of one-page tiles, split-K over a transposed key
# view, balanced splits of uneven heads (an empty head among them).
_FP8_OPTIONS = {
    1: (dict(empty_head=1), dict(num_splits=1, pages_per_iter=1)),
    4: (dict(transposed=True), dict(num_splits=3)),
    8: (dict(keep_fn=_uneven_keep), dict(balance_splits=4, balance_min_iters=1,
                                         pages_per_iter=1)),
}


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16], ids=["q32", "q16"])
@pytest.mark.parametrize("fp8", FP8, ids=["e4m3fn", "e5m2"])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_fp8_cache_matches_dequantized_reference(group, fp8, q_dtype):
    build, options = _FP8_OPTIONS[group]
    args = _fp8_batch(group, 64, fp8, q_dtype, [1, 3, 1], pad_tokens=2, **build)
    _check_fp8(args, 1e-4 if q_dtype == torch.float32 else 2e-2, pad_tokens=2, **options)


@pytest.mark.parametrize("fp8", FP8, ids=["e4m3fn", "e5m2"])
def test_fp8_pooled(fp8):
    """Head-pages pooled across layers (chunk tables, every layer of the batch; split-K and
    balanced): reference and kernel == the float64 reference on dequantized caches."""
    from tests.kernels.test_pooling import _pooled_decode_batch, _run_pooled_decode
    from tests.kernels.test_triton_scoring import fp8_scale

    x = _pooled_decode_batch(4, 64, fp8)
    x["query"] = torch.randn(x["query"].shape)
    k_scale, v_scale = fp8_scale(), fp8_scale()
    x64 = _dequantized(x, k_scale, v_scale)
    written = torch.zeros(x["query"].shape[0], dtype=torch.bool)
    for _, _, q0, q1, *_ in x["rows"].tolist():
        written[q0:q1] = True
    for layer in range(x["start_tab"].shape[1]):
        want = _run_pooled_decode(x64, layer, headwise_attention_ranges_reference)
        ref = _run_pooled_decode(x, layer, headwise_attention_ranges_reference,
                                 k_scale=k_scale, v_scale=v_scale)
        torch.testing.assert_close(ref[written].double(), want[written], rtol=1e-4, atol=1e-4)
        for options in ({"num_splits": 2}, {"balance_splits": 4, "balance_min_iters": 1}):
            got = _run_pooled_decode(x, layer, headwise_attention_ranges_triton,
                                     k_scale=k_scale, v_scale=v_scale, pages_per_iter=1,
                                     **options)
            assert not torch.isnan(got[written]).any(), "row tokens not fully written"
            assert torch.isnan(got[~written]).all(), "tokens of other rows left untouched"
            torch.testing.assert_close(got[written].double(), want[written], rtol=1e-4,
                                       atol=1e-4)


def test_fp8_scale_none_is_one_and_other_caches_ignore_it():
    """Scales None read fp8 values as they are; a bf16 cache ignores given scales (as
    vLLM does for unquantized caches), in the reference and the kernel; raw uint8 bytes
    (no fp8 view) are refused."""
    from tests.kernels.test_triton_scoring import fp8_scale

    for dtype, scales, none in ((torch.float8_e4m3fn, dict(k_scale=torch.ones(1),
                                                           v_scale=torch.ones(1)), {}),
                                (torch.bfloat16, {}, dict(k_scale=fp8_scale(),
                                                          v_scale=fp8_scale()))):
        args = _build(4, 64, dtype, [1, 2])
        args["query"] = args["query"].float()
        for impl in (headwise_attention_ranges_reference, headwise_attention_ranges_triton):
            a = _triton(args, torch.full_like(args["query"], float("nan")), impl=impl, **scales)
            b = _triton(args, torch.full_like(args["query"], float("nan")), impl=impl, **none)
            assert torch.equal(a, b)
            if dtype == torch.float8_e4m3fn:
                raw = dict(args, key_cache=args["key_cache"].view(torch.uint8),
                           value_cache=args["value_cache"].view(torch.uint8))
                with pytest.raises(TypeError, match="view an fp8 cache"):
                    _triton(raw, torch.empty_like(args["query"]), impl=impl, **scales)


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16], ids=["q32", "q16"])
@pytest.mark.parametrize("fp8", FP8, ids=["e4m3fn", "e5m2"])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_masked_prompt_attention_fp8(group, fp8, q_dtype):
    """The pre-compaction path (queries past the prompt over each head's kept prompt
    positions and the tail) on fp8 caches == its float64 result on the dequantized caches
    and queries; the output in the query dtype, every element written."""
    from tests.kernels.test_triton_scoring import fp8_scale

    heads = 4 if group < 8 else 2
    dim, prompt = 64, int(torch.randint(40, 130, ()))
    seq_len = prompt + int(torch.randint(1, 12, ()))
    table, nblocks = random_block_tables([seq_len], BLOCK_SIZE)
    kc = torch.full((nblocks, heads, BLOCK_SIZE, dim), float("nan"), dtype=fp8)
    vc = torch.full_like(kc, float("nan"))
    write_tokens(kc, vc, table[0], torch.arange(seq_len),
                 torch.randn(seq_len, heads, dim).to(fp8), torch.randn(seq_len, heads, dim).to(fp8))
    keep = _keep_mask(heads, prompt, empty_head=0)
    q_len = seq_len - prompt
    query = torch.randn(q_len, heads * group, dim).to(q_dtype)
    k_scale, v_scale = fp8_scale(), fp8_scale()
    want = masked_prompt_attention_reference(
        query.double(), kc.double() * k_scale.double(), vc.double() * v_scale.double(),
        table[0], keep, seq_len, dim**-0.5, torch.full(query.shape, float("nan"),
                                                      dtype=torch.float64))
    out = torch.full_like(query, float("nan"))
    got = masked_prompt_attention_reference(query, kc, vc, table[0], keep, seq_len, dim**-0.5,
                                            out, k_scale=k_scale, v_scale=v_scale)
    assert got is out and not torch.isnan(out).any()
    tol = 1e-5 if q_dtype == torch.float32 else 1e-2  # the output's rounding
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
