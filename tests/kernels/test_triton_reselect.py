"""Scores of one decode event (issue 29) read in place from the paged layout: the Triton
kernels (run by the Triton interpreter on CPU) and the torch path
(``score_decode_event_reference``) against ``score_decode_windows_reference`` in float64
on the dense candidates the layout was built from.

Fresh random events each run (the seed is in the failure message): several rows in
shuffled batch rows and slots, uneven per-head page counts (row 0 has a head with no kept
token, row 1 an empty tail), head-pages in a random head order with gaps, the tail from
``tail_start`` past the pages, cache slots nobody may read (the rest of a head's last page,
tail blocks before ``tail_start``, null blocks) full of NaN, and both the single-layer and
the pooled (two-layer view) page addressing. Tolerance: fp32 queries on fp32 caches
atol/rtol 1e-5 against float64 (scores are window sums of probabilities, at most ``w``).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from vllm_adakv.kernels import score_decode_event  # noqa: E402
from vllm_adakv.kernels.decode import row_table  # noqa: E402
from vllm_adakv.kernels.scoring import (  # noqa: E402
    pool_candidates,
    pool_rows,
    score_decode_event_reference,
    score_decode_windows_reference,
)
from vllm_adakv.kernels.triton_reselect import MAX_SPLITS, score_decode_event_triton  # noqa: E402

BLOCK_SIZE = 16
F64 = torch.float64


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _new_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def _event(seed: int, group: int, window: int, *, pooled: bool = False, heads: int = 2,
           dim: int = 32, num_rows: int = 3, cache_dtype: torch.dtype = torch.float32,
           q_dtype: torch.dtype = torch.float32, layout: str = "contiguous") -> dict:
    """A random event in a paged layout and its dense float64 truth (module doc)."""
    gen = torch.Generator().manual_seed(seed)

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (), generator=gen))

    kept = [[randint(1, 45) for _ in range(heads)] for _ in range(num_rows)]
    kept[0][randint(0, heads - 1)] = 0
    n_tail = [randint(1, 40) for _ in range(num_rows)]
    n_tail[1] = 0
    layers = 2 if pooled else 1
    # Head-page entries: heads in a random order, a gap of 0-1 entries before each.
    starts, plans = [], []
    for r in range(num_rows):
        entry, start = 0, [0] * heads
        for h in torch.randperm(heads, generator=gen).tolist():
            entry += randint(0, 1)
            start[h] = entry
            entry += _cdiv(kept[r][h], BLOCK_SIZE)
        page_blocks = max(1, _cdiv(entry, heads * layers))  # per chunk
        tail_start = page_blocks * BLOCK_SIZE + randint(0, 20)
        seq_len = tail_start + n_tail[r] + window
        starts.append(start)
        plans.append((page_blocks, tail_start, seq_len))
    width_blocks = max(_cdiv(s, BLOCK_SIZE) for _, _, s in plans)
    need = sum(p + _cdiv(s, BLOCK_SIZE) - t // BLOCK_SIZE for p, t, s in plans)
    ids = (torch.randperm(need + 2, generator=gen)[: need] + 1).tolist()  # 0: null block
    per_layer = need + 3
    batch_rows = torch.randperm(num_rows + 1, generator=gen)[:num_rows]
    slots = torch.randperm(num_rows + 2, generator=gen)[:num_rows]
    block_table = torch.zeros(num_rows + 1, width_blocks, dtype=torch.int32)
    # Slots no row uses hold counts and starts that would read garbage.
    page_start = torch.full((num_rows + 2, heads), 10**6, dtype=torch.int32)
    kept_counts = torch.full((num_rows + 2, heads), 10**4, dtype=torch.int32)
    chunk_base = torch.full((num_rows + 2, layers), 10**6, dtype=torch.int32)
    capacity = torch.full((num_rows + 2,), 1, dtype=torch.int32)
    layer_base = per_layer if pooled else 0
    if layout == "contiguous":
        cache = torch.full((layers * per_layer, heads, BLOCK_SIZE, dim), float("nan"))
    else:  # FlashAttention's [nb, 2, bs, H, D] pair, keys viewed as [nb, H, bs, D]
        pair = torch.full((layers * per_layer, 2, BLOCK_SIZE, heads, dim), float("nan"))
        cache = pair[:, 0].permute(0, 2, 1, 3)
    fp8 = cache_dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    k_scale = (0.05 + 0.6 * torch.rand(1, generator=gen)).float() if fp8 else None
    cache = cache.to(cache_dtype) if layout == "contiguous" else cache
    if layout != "contiguous":
        assert cache_dtype == torch.float32

    def put(where: tuple, value: torch.Tensor) -> None:
        """``cache[where] = value`` (through bytes for fp8: index_put takes no fp8)."""
        if fp8:
            cache.view(torch.uint8)[where] = value.view(torch.uint8)
        else:
            cache[where] = value

    def token(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` random keys ``[n, D]`` as stored and as read (float64)."""
        x = torch.randn(n, dim, generator=gen)
        stored = (x / k_scale).to(cache_dtype) if fp8 else x.to(cache_dtype)
        read = stored.to(F64) * k_scale.double() if fp8 else stored.to(F64)
        return stored, read

    width = max(max(k) + t for k, t in zip(kept, n_tail, strict=True)) + randint(0, 5)
    keys = torch.zeros(num_rows, heads, width, dim, dtype=F64)
    wkeys = torch.zeros(num_rows, heads, window, dim, dtype=F64)
    counts = torch.zeros(num_rows, heads, dtype=torch.long)
    for r, (page_blocks, tail_start, seq_len) in enumerate(plans):
        b, s = int(batch_rows[r]), int(slots[r])
        first_tail = tail_start // BLOCK_SIZE
        entries = list(range(page_blocks)) + list(range(first_tail, _cdiv(seq_len, BLOCK_SIZE)))
        for e in entries:
            block_table[b, e] = ids.pop()
        page_start[s] = torch.tensor(starts[r])
        kept_counts[s] = torch.tensor(kept[r])
        cap = page_blocks * heads
        capacity[s] = cap
        chunk_base[s] = torch.randperm(layers, generator=gen).int() * per_layer
        for h in range(heads):
            stored, read = token(kept[r][h])
            for i in range(kept[r][h]):
                g = starts[r][h] + i // BLOCK_SIZE
                chunk, local = (g // cap, g % cap) if pooled else (0, g)
                blk = int(chunk_base[s, chunk] if pooled else 0) + int(
                    block_table[b, local // heads])
                put((blk, local % heads, i % BLOCK_SIZE), stored[i])
            keys[r, h, : kept[r][h]] = read
        for p in range(tail_start, seq_len):
            stored, read = token(heads)
            blk = layer_base + int(block_table[b, p // BLOCK_SIZE])
            put((blk, slice(None), p % BLOCK_SIZE), stored)
            c = p - tail_start
            if p < seq_len - window:
                for h in range(heads):
                    keys[r, h, kept[r][h] + c] = read[h]
            else:
                wkeys[r, :, p - (seq_len - window)] = read
        counts[r] = torch.tensor(kept[r]) + n_tail[r]
    queries = (torch.randn(num_rows, window, heads * group, dim, generator=gen) * 1.5)
    queries = queries.to(q_dtype)
    idx = torch.zeros(num_rows, dtype=torch.int32)
    rows = row_table(batch_rows, slots, idx, idx,
                     torch.tensor([t for _, t, _ in plans]), torch.tensor([s for _, _, s in plans]))
    args = dict(key_cache=cache, page_start=page_start, kept_counts=kept_counts,
                block_table=block_table, rows=rows, width=width, scale=dim**-0.5,
                k_scale=k_scale)
    if pooled:
        args.update(chunk_base=chunk_base, capacity=capacity, layer_base=layer_base)
    return dict(args=args, queries=queries, keys=keys, wkeys=wkeys, counts=counts,
                seed=seed)


def _want(ev: dict, **kw) -> torch.Tensor:
    """float64 scores of the dense truth."""
    return score_decode_windows_reference(
        ev["queries"].to(F64), ev["keys"], ev["counts"], ev["wkeys"], ev["args"]["scale"],
        **kw)


def _close(got: torch.Tensor, want: torch.Tensor, ev: dict, tol: float) -> None:
    msg = f"seed {ev['seed']}"
    assert got.shape == want.shape, msg
    assert torch.equal(torch.isinf(got), torch.isinf(want)), msg
    valid = torch.isfinite(want)
    assert torch.isfinite(got[valid]).all(), msg
    torch.testing.assert_close(got[valid].to(F64), want[valid], atol=tol, rtol=tol, msg=msg)


CASES = [(2, 4, "max", "mean", 7), (4, 8, "avg", "max", 5), (4, 5, "max", "max", 3),
         (2, 6, "avg", "mean", 1)]


@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("group,window,pooling,gqa_reduce,kernel", CASES)
def test_matches_float64_definition(group, window, pooling, gqa_reduce, kernel, pooled):
    """The torch path (float64 queries) equals the dense float64 scores; the Triton
    kernels (fp32) match them to 1e-5."""
    ev = _event(_new_seed(), group, window, pooled=pooled)
    kw = dict(gqa_reduce=gqa_reduce, pooling=pooling, pool_kernel=kernel)
    want = _want(ev, **kw)
    ref = score_decode_event_reference(ev["queries"].to(F64), **ev["args"], **kw)
    assert ref.dtype == F64
    _close(ref, want, ev, 1e-12)
    got = score_decode_event_triton(ev["queries"], **ev["args"], **kw)
    assert got.dtype == torch.float32
    _close(got, want, ev, 1e-5)
    assert torch.isinf(got[:, :, ev["counts"].max():]).all()


@pytest.mark.parametrize("num_splits", [1, 3, MAX_SPLITS, 10**3])
def test_key_splits(num_splits):
    """Statistics over 1 to ``MAX_SPLITS`` key splits (some empty; more are capped)."""
    ev = _event(_new_seed(), 4, 8, num_rows=2)
    kw = dict(gqa_reduce="mean", pooling="max", pool_kernel=7)
    got = score_decode_event_triton(ev["queries"], **ev["args"], num_splits=num_splits, **kw)
    _close(got, _want(ev, **kw), ev, 1e-5)


def test_strided_cache_view():
    """Keys viewed from FlashAttention's [nb, 2, bs, H, D] cache (non-contiguous)."""
    ev = _event(_new_seed(), 2, 8, layout="flash", pooled=True)
    assert not ev["args"]["key_cache"].is_contiguous()
    kw = dict(gqa_reduce="max", pooling="avg", pool_kernel=3)
    got = score_decode_event_triton(ev["queries"], **ev["args"], **kw)
    _close(got, _want(ev, **kw), ev, 1e-5)


@pytest.mark.parametrize("fp8,q_dtype", [(torch.float8_e4m3fn, torch.bfloat16),
                                         (torch.float8_e5m2, torch.float32)])
def test_fp8_cache(fp8, q_dtype):
    """fp8 keys read as ``value * k_scale``: both paths against float64 on the dequantized
    keys (bf16 queries: the reference sees the same rounded queries)."""
    ev = _event(_new_seed(), 4, 6, cache_dtype=fp8, q_dtype=q_dtype)
    kw = dict(gqa_reduce="mean", pooling="avg", pool_kernel=5)
    want = _want(ev, **kw)
    _close(score_decode_event_reference(ev["queries"].to(F64), **ev["args"], **kw), want, ev,
           1e-12)
    _close(score_decode_event_triton(ev["queries"], **ev["args"], **kw), want, ev, 1e-5)


def test_low_precision_cache():
    """bf16 queries on a bf16 cache (fp32 softmax)."""
    ev = _event(_new_seed(), 2, 8, cache_dtype=torch.bfloat16, q_dtype=torch.bfloat16)
    kw = dict(gqa_reduce="max", pooling="max", pool_kernel=5)
    _close(score_decode_event_triton(ev["queries"], **ev["args"], **kw), _want(ev, **kw), ev,
           1e-5)


def test_dispatcher_runs_the_torch_path_on_cpu():
    ev = _event(_new_seed(), 2, 4, num_rows=2)
    kw = dict(gqa_reduce="mean", pooling="max", pool_kernel=3)
    got = score_decode_event(ev["queries"], **ev["args"], **kw)
    assert got.dtype == torch.float32
    assert torch.equal(got, score_decode_event_reference(ev["queries"], **ev["args"], **kw))
    _close(got, _want(ev, **kw), ev, 1e-5)


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("kernel", [1, 3, 7])
def test_pool_candidates_matches_pool_rows(pooling, kernel):
    """Pooling with device counts (no host sync) == ``pool_rows`` (counts as a list)."""
    scores = torch.rand(3, 4, 20, dtype=F64)
    counts = torch.randint(0, 21, (3, 4))
    counts[0, 0], counts[1, 2] = 0, 20
    want = pool_rows(scores.view(12, 1, 20), counts.flatten().tolist(), pooling, kernel)
    got = pool_candidates(scores, counts, pooling, kernel)
    assert torch.equal(torch.isinf(got), torch.isinf(want.view(3, 4, 20)))
    torch.testing.assert_close(got, want.view(3, 4, 20), atol=1e-14, rtol=1e-14)


def test_bad_input_is_refused():
    ev = _event(_new_seed(), 2, 4, num_rows=2)
    q, args = ev["queries"], ev["args"]
    kw = dict(gqa_reduce="mean", pooling="max", pool_kernel=3)
    for impl in (score_decode_event_triton, score_decode_event_reference):
        with pytest.raises(ValueError, match="gqa_reduce"):
            impl(q, **args, **{**kw, "gqa_reduce": "sum"})
        with pytest.raises(ValueError, match="pooling"):
            impl(q, **args, **{**kw, "pooling": "min"})
        with pytest.raises(ValueError, match="pool_kernel"):
            impl(q, **args, **{**kw, "pool_kernel": 4})
        with pytest.raises(ValueError, match="rows"):
            impl(q[:1], **args, **kw)
    with pytest.raises(ValueError, match="rows"):
        score_decode_event_triton(q, **{**args, "rows": args["rows"][:, :5]}, **kw)
    with pytest.raises(ValueError, match="float64"):
        score_decode_event_triton(q.to(F64), **args, **kw)
    with pytest.raises(ValueError, match="width"):
        score_decode_event_triton(q, **{**args, "width": -1}, **kw)
    # The torch path checks what the kernels cannot without a host sync.
    with pytest.raises(ValueError, match="do not fit in width"):
        score_decode_event_reference(q, **{**args, "width": int(ev["counts"].max()) - 1}, **kw)
    late = args["rows"].clone()
    late[0, 4] = late[0, 5] - 3  # a tail that starts inside the window of 4
    with pytest.raises(ValueError, match="must hold the window"):
        score_decode_event_reference(q, **{**args, "rows": late}, **kw)
