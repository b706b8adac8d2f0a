"""Triton kernels on a CUDA device at real sizes, against the torch references.

Skipped without CUDA (CI is CPU-only: there the same kernels run under the Triton
interpreter in tests/kernels). Llama-3.1-8B layer shape (32 query heads, 8 KV
heads, d=128) plus GQA 1/4 and d=64; fresh random inputs; outputs poisoned before
the call. Tolerances: bf16 inputs against the fp32 reference on the same rounded
inputs, rtol/atol 2e-2 (attention outputs) and 2e-3 absolute (window scores). fp8 KV
caches (end of the module): random per-layer scales, references in float64 on the
dequantized caches, the same tolerances by output dtype; compaction byte for byte.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from tests.kernels.oracles import score_window_triton  # noqa: E402
from tests.kernels.paged_cache import random_block_tables, write_tokens  # noqa: E402
from vllm_adakv.kernels import (  # noqa: E402
    compact_ranges_reference,
    headwise_attention_ranges_reference,
    score_window_reference,
)
from vllm_adakv.kernels.decode import row_table  # noqa: E402
from vllm_adakv.kernels.triton_decode import (  # noqa: E402
    headwise_attention_ranges_triton,
)

DEV = "cuda"
BS = 16


@pytest.mark.parametrize("length", [2048, 8192, 32768])
@pytest.mark.parametrize("q_heads,kv_heads,dim", [(32, 8, 128), (8, 8, 64)])
def test_scoring_real_sizes(length, q_heads, kv_heads, dim):
    table, nb = random_block_tables([length], BS)
    kc = torch.full((nb, kv_heads, BS, dim), float("nan"), dtype=torch.bfloat16, device=DEV)
    vc = torch.zeros_like(kc)
    keys = torch.randn(length, kv_heads, dim, device=DEV).to(torch.bfloat16)
    write_tokens(kc, vc, table[0].to(DEV), torch.arange(length, device=DEV), keys, keys)
    window = 32
    q = (torch.randn(window, q_heads, dim, device=DEV) * 2).to(torch.bfloat16)
    blocks = table[0].to(DEV)
    kw = dict(gqa_reduce="mean", pooling="max", pool_kernel=7)
    got = score_window_triton(q, kc, blocks, length, dim**-0.5, **kw)
    want = score_window_reference(q, kc, blocks, length, dim**-0.5, **kw)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("group,dim", [(4, 128), (1, 64), (8, 128)])
def test_range_decode_real_sizes(group, dim):
    heads, rows = 8 if group < 8 else 4, 32
    lengths = [int(x) for x in torch.randint(1500, 2500, (rows,))]
    seq = [n + int(torch.randint(1, 40, ())) for n in lengths]
    table, nb = random_block_tables(seq, BS)
    table = table.to(DEV)
    kc = torch.randn(nb, heads, BS, dim, device=DEV).to(torch.bfloat16)
    vc = torch.randn_like(kc)
    starts = torch.zeros(rows, heads, dtype=torch.int32, device=DEV)
    counts = torch.zeros_like(starts)
    for r, n in enumerate(lengths):
        budget = torch.randint(0, n // 2, (heads,), device=DEV)
        keep = torch.rand(heads, n, device=DEV).argsort(1) < budget[:, None]
        keep[:, n - 32:] = True
        starts[r], counts[r] = compact_ranges_reference(kc, vc, table[r], keep, n // BS)
    q_lens = torch.ones(rows, dtype=torch.int64)
    q_lens[:3] = torch.tensor([4, 2, 7])  # a few rows with several query tokens
    qsl = torch.cat([torch.zeros(1, dtype=torch.int64), q_lens.cumsum(0)])
    query = torch.randn(int(qsl[-1]) + 3, heads * group, dim, device=DEV).to(torch.bfloat16)
    idx = torch.arange(rows)
    rows_t = row_table(idx, idx, qsl[:-1], qsl[1:], torch.tensor(lengths),
                       torch.tensor(seq)).to(DEV)
    args = dict(query=query, key_cache=kc, value_cache=vc, page_start=starts,
                kept_counts=counts, block_table=table, rows=rows_t,
                num_row_tokens=int(qsl[-1]), scale=dim**-0.5)
    want = torch.full(query.shape, float("nan"), device=DEV)
    headwise_attention_ranges_reference(**args, out=want)
    for options in ({"num_splits": 1}, {}, {"balance_splits": 4},
                    {"balance_splits": 8, "balance_min_iters": 1}):
        out = torch.full_like(query, float("nan"))
        headwise_attention_ranges_triton(**args, out=out, **options)
        n = int(qsl[-1])
        assert not torch.isnan(out[:n]).any() and torch.isnan(out[n:]).all()
        torch.testing.assert_close(out[:n].float(), want[:n], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn],
                         ids=["bf16", "fp8"])
def test_compression_never_waits_for_the_gpu(cache_dtype):
    """Scoring, selection and compaction of several requests, and the page-range store,
    under PyTorch's sync debug mode: any synchronising call (a blocking upload, an
    ``.item()``, ``nonzero``) raises. A sync would stall the host inside the forward pass,
    so the launches that follow could no longer queue behind the layer's prefill. Also on
    an fp8 cache with its device scale (read by the kernels, never by the host)."""
    from vllm_adakv.config import KVCompressionConfig
    from vllm_adakv.kernels import compact_rows_ranges, score_windows
    from vllm_adakv.methods import get_method
    from vllm_adakv.tensors import on_device
    from vllm_adakv.worker.range_pool import RangePool

    heads, q_heads, dim, window = 8, 32, 128, 32
    lengths = [3000, 4100, 2048]
    table, nb = random_block_tables(lengths, BS)
    table = table.to(DEV)
    kv = torch.randn(nb, heads, BS, 2 * dim, device=DEV).to(cache_dtype)
    queries = torch.randn(3, window, q_heads, dim, device=DEV).to(torch.bfloat16)
    k_scale = torch.tensor(0.4, device=DEV)  # as vLLM's layer._k_scale (ignored for bf16)
    pool = RangePool(4, 2, heads, device=DEV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for method in ("adakv", "snapkv"):
            scores = score_windows(queries, kv[..., :dim], table, [0, 1, 2], lengths,
                                   dim**-0.5, gqa_reduce="mean", pooling="max", pool_kernel=7,
                                   k_scale=k_scale)
            masks = get_method(method).select(
                scores, num_heads=heads, prompt_lens=lengths, budgets=[512, 700, 300],
                cfg=KVCompressionConfig(method=method, window=window))
            done = compact_rows_ranges(kv[..., :dim], kv[..., dim:], table, [0, 1, 2], masks,
                                       [48, 60, 30])
            bases = on_device([0, nb], torch.int32, DEV)
            pool.store_rows(["a", "b", "c"], [1], torch.stack([p for p, _ in done])[:, None],
                            torch.stack([c for _, c in done])[:, None],
                            bases[None].expand(3, -1),
                            on_device([48 * heads, 60 * heads, 30 * heads], torch.int32, DEV))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert pool.kept_counts[:3, 1].sum(1).tolist() == [8 * 512, 8 * 700, 8 * 300]


@pytest.mark.parametrize("cache", ["bf16", "fp8"])
@pytest.mark.parametrize("method", ["adakv", "pyramidkv"])  # own tensors, pooled
def test_worker_compression_step_never_waits_for_the_gpu(method, cache):
    """The worker's whole path of a step that completes three prompts, over 4 layers
    (window queries, ``CompressionStore.compress_rows``, the kept-count report, the page
    ranges) under sync debug mode "error". The kernel-level test above skips the store: a
    serving run on an H200 (2026-12-02) showed the host held inside the plugin's prompt
    steps until the GPU was done. Then every layer keeps its budget. Also on an fp8 cache
    with the layers' device scales, as the backend passes them."""
    from tests.worker.test_compressor import check_kept, run_worker_compression

    fp8 = {}
    if cache == "fp8":
        fp8 = {"cache_dtype": torch.float8_e4m3fn,
               "k_scale": torch.tensor(0.37, device=DEV), "v_scale": torch.tensor(1.9, device=DEV)}
    plans, pool, store = run_worker_compression(
        DEV, method, [3000, 4100, 2048], num_layers=4, budget=512, dtype=torch.bfloat16,
        sync_debug=True, **fp8)
    torch.cuda.synchronize()
    check_kept(plans, pool, store, heads=8)


@pytest.mark.parametrize("length", [2048, 8192])
def test_expected_scorer_real_sizes_never_waits(length):
    """The expected scorer at the 8B layer's shape: the Triton moments of a bf16 chunk (a
    strided view of packed q/k/v rows) against float64 ones, and the scores of its
    Gaussian on a paged bf16 cache against float64; then the whole path (moments, the
    Gaussian at future positions, scores) under sync debug mode "error"."""
    from vllm_adakv.kernels import score_expected, unrotated_moments
    from vllm_adakv.kernels.expected import future_moments, unrotated_moments_reference

    q_heads, heads, dim = 32, 8, 128
    angles = torch.arange(length + 600, device=DEV, dtype=torch.float32)[:, None] * \
        torch.logspace(0, -4, dim // 2, device=DEV)[None]
    cos_sin = torch.cat((angles.cos(), angles.sin()), -1).contiguous()
    packed = torch.randn(length, q_heads + 2 * heads, dim, device=DEV).to(torch.bfloat16)
    query, positions = packed[:, :q_heads], torch.arange(length, device=DEV)
    got = unrotated_moments(query, positions, cos_sin, dim, True)
    want = unrotated_moments_reference(query.double(), positions, cos_sin.double(), dim, True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-3, atol=1e-3 * w.abs().max().item())
    table, nb = random_block_tables([length], BS)
    table = table.to(DEV)
    keys = torch.randn(nb, heads, BS, dim, device=DEV).to(torch.bfloat16)
    mu, sigma = future_moments(*want, length, length, 512, cos_sin.double(), dim, True)
    sigma = sigma * 0.05  # a spread that leaves the softmax unsaturated
    scores = score_expected(mu.float()[None], sigma.float()[None], keys, table, [0], [length],
                            dim**-0.5, gqa_reduce="mean")
    ref = score_expected(mu[None], sigma[None], keys.double(), table, [0], [length],
                         dim**-0.5, gqa_reduce="mean")
    torch.testing.assert_close(scores, ref, rtol=2e-3, atol=1e-6)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total, second = unrotated_moments(query, positions, cos_sin, dim, True)
        mu32, sigma32 = future_moments(total, second, length, length, 512, cos_sin, dim, True)
        score_expected(mu32[None], sigma32[None], keys, table, [0], [length], dim**-0.5,
                       gqa_reduce="mean")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.parametrize("lengths", [[4000], [2048, 8192, 700], [32768]])
def test_gvote_vote_never_waits_for_the_gpu(lengths):
    """GVote's batched vote of one layer (voters, Triton voter attention, top-cap mass,
    cap and masks) under sync debug mode "error", on a bf16 paged cache of requests of
    different lengths; the voter attention equals the torch reference on the CPU, and
    the kept sets equal the CPU pipeline's up to a few boundary keys (float32 on two
    devices)."""
    from vllm_adakv import kernels
    from vllm_adakv.methods.gvote import gvote_keep_masks, gvote_voters

    window, q_heads, heads, dim = 32, 32, 8, 128
    table, nb = random_block_tables(lengths, BS)
    kc = torch.full((nb, heads, BS, dim), float("nan"), dtype=torch.bfloat16, device=DEV)
    vc = torch.zeros_like(kc)
    for r, n in enumerate(lengths):
        keys = torch.randn(n, heads, dim, device=DEV).to(torch.bfloat16)
        write_tokens(kc, vc, table[r].to(DEV), torch.arange(n, device=DEV), keys, keys)
    wq = (torch.randn(len(lengths), window, q_heads, dim, device=DEV) * 2).to(torch.bfloat16)
    caps = [max(window, n // 8) for n in lengths]
    rows = list(range(len(lengths)))

    def vote(q, cache, tab):
        voters = gvote_voters(q, 8, 3, 5)
        probs = kernels.voter_probs(voters, cache, tab, rows, lengths, dim**-0.5)
        mass = kernels.min_mass_above(probs, lengths, 0.9, max(caps))
        return probs, gvote_keep_masks(mass, lengths, window=window, nucleus_p=0.9,
                                       max_keeps=caps, pool_kernel=7)

    table_dev = table.to(DEV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        probs, mask = vote(wq, kc, table_dev)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    cpu_probs, cpu_mask = vote(wq.cpu(), kc.cpu(), table)
    torch.testing.assert_close(probs.cpu(), cpu_probs, rtol=1e-3, atol=1e-7)
    differ = (mask.cpu() != cpu_mask).sum(-1)
    assert int(differ.max()) <= 4, differ.tolist()
    for r, n in enumerate(lengths):
        assert int(mask[r].sum(-1).max()) <= caps[r]
        assert not mask[r, :, n:].any()


# Head-pages pooled across layers: Llama-3.1-8B's 32 layers in one buffer, 4 requests of
# 8k tokens whose layers keep very different amounts (GVote-like: per-layer shares of the
# budget from a Dirichlet, mean 1/8 of the prompt).
POOL_LAYERS, POOL_HEADS, POOL_Q_HEADS, POOL_DIM = 32, 8, 32, 128


def _pooled_setup(lengths: list[int], seed: int = 0, fresh_blocks: int = 0,
                  dtype: torch.dtype = torch.bfloat16):
    """Table, all-layers buffer (``dtype``; fp8: random bytes), layer bases and masks.
    ``fresh_blocks``: block ids past the table's (from ``table.max() + 1`` on) that each
    layer's tensor has too."""
    torch.manual_seed(seed)
    layers, heads = POOL_LAYERS, POOL_HEADS
    table, nb = random_block_tables(lengths, BS)
    order = torch.randperm(layers)
    per_layer = nb + fresh_blocks
    layer_bases = (order * per_layer).to(torch.int32)
    kv = _random_cache((layers * per_layer + 1, heads, BS, 2 * POOL_DIM), dtype)
    masks = torch.zeros(len(lengths), layers, heads, max(lengths), dtype=torch.bool,
                        device=DEV)
    for r, n in enumerate(lengths):
        shares = torch.distributions.Dirichlet(torch.ones(layers)).sample()
        rates = (shares * layers / 8).clamp(max=1.0)
        head_rates = (rates[:, None] * (0.5 + torch.rand(layers, heads))).clamp(max=1.0)
        keep = torch.rand(layers, heads, n, device=DEV) < head_rates[..., None].to(DEV)
        keep[:, :, n - 32 : n] = True
        masks[r, :, :, :n] = keep
    return table.to(DEV), kv, layer_bases.to(DEV), masks


def test_pooled_compaction_real_sizes():
    from vllm_adakv.kernels.compaction import compact_pooled_rows_reference
    from vllm_adakv.kernels.triton_compaction import compact_pooled_rows_triton

    lengths = [8192, 8000, 8192, 7900]
    table, kv, layer_bases, masks = _pooled_setup(lengths)
    block_rows = [2, 0, 3, 1]
    masks = masks[torch.tensor(block_rows)]  # row r is block row block_rows[r]
    pages = (masks.sum(3) + BS - 1) // BS
    need = [max(1, -(-int(p.sum()) // (POOL_LAYERS * POOL_HEADS))) for p in pages]
    dim = POOL_DIM
    for kept_blocks in ([None] * 4, [need[0], need[1] + 3, None, need[3]]):
        got_kv, want_kv = kv.clone(), kv.clone()
        want = compact_pooled_rows_reference(want_kv[..., :dim], want_kv[..., dim:], table,
                                             block_rows, masks, layer_bases, kept_blocks)
        got = compact_pooled_rows_triton(got_kv[..., :dim], got_kv[..., dim:], table,
                                         block_rows, masks, layer_bases.cpu(), kept_blocks)
        for name, g, w in zip(("page_start", "counts", "chunk_layer", "kept_blocks"), got,
                              want, strict=True):
            assert g.is_cuda and g.dtype == torch.int32, name
            assert torch.equal(g, w.to(DEV)), name
        assert torch.equal(got_kv.view(torch.int16), want_kv.view(torch.int16))
        del got_kv, want_kv
        torch.cuda.empty_cache()


def _sync_free(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` under sync debug mode "error" (any host sync raises)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn(*args, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _random_cache(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Random cache contents; fp8 as random bytes (compaction moves bytes)."""
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return torch.randint(0, 256, shape, dtype=torch.uint8, device=DEV).view(dtype)
    return torch.randn(shape, device=DEV).to(dtype)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
@pytest.mark.parametrize("heads,dim", [(8, 128), (2, 64)])
def test_compaction_into_fresh_blocks_real_sizes(heads, dim, dtype):
    """``compact_rows_triton`` into fresh destination blocks (the prefix-caching path) for 4
    requests of 2k-32k tokens, rows shuffled, kept blocks tight and with spare ones: with
    the destination table on the device and on the host, under sync debug mode "error",
    byte-equal to the reference with the same destinations, which leaves every source
    block as it was; in place still equals the reference. bf16 and fp8 caches."""
    from vllm_adakv.kernels.compaction import compact_rows_reference
    from vllm_adakv.kernels.triton_compaction import compact_rows_triton

    lengths = [8192, 2048, 32768, 5000]
    table, nb = random_block_tables(lengths, BS)
    table = table.to(DEV)
    block_rows = [2, 0, 3, 1]
    masks = torch.zeros(4, heads, max(lengths), dtype=torch.bool, device=DEV)
    for r, b in enumerate(block_rows):
        n = lengths[b]
        budget = torch.randint(0, n // 2, (heads,), device=DEV)
        keep = torch.rand(heads, n, device=DEV).argsort(1) < budget[:, None]
        keep[:, n - 32:] = True
        masks[r, :, :n] = keep
    pages = ((masks.sum(2) + BS - 1) // BS).sum(1).tolist()
    kept = [-(-p // heads) + spare for p, spare in zip(pages, [0, 1, 0, 3], strict=True)]
    width = max(kept) + 2
    dst = (nb + torch.randperm(4 * width)).view(4, width).to(torch.int32)
    kv = _random_cache((nb + dst.numel(), heads, BS, 2 * dim), dtype)
    want_kv = kv.clone()
    want = compact_rows_reference(want_kv[..., :dim], want_kv[..., dim:], table, block_rows,
                                  masks, kept, dst_blocks=dst.to(DEV))
    assert torch.equal(_bytes(want_kv[:nb]), _bytes(kv[:nb]))
    assert not torch.equal(_bytes(want_kv[nb:]), _bytes(kv[nb:]))
    for dst_blocks in (dst.to(DEV), dst):  # on the device, on the host
        got_kv = kv.clone()
        got = _sync_free(compact_rows_triton, got_kv[..., :dim], got_kv[..., dim:], table,
                         block_rows, masks, kept, dst_blocks=dst_blocks)
        for name, g, w in zip(("page_start", "counts"), got, want, strict=True):
            assert g.is_cuda and g.dtype == torch.int32 and torch.equal(g, w), name
        assert torch.equal(_bytes(got_kv), _bytes(want_kv))
        del got_kv
    got_kv, want_kv = kv.clone(), kv.clone()
    want = compact_rows_reference(want_kv[..., :dim], want_kv[..., dim:], table, block_rows,
                                  masks, kept)
    got = _sync_free(compact_rows_triton, got_kv[..., :dim], got_kv[..., dim:], table,
                     block_rows, masks, kept)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(_bytes(got_kv), _bytes(want_kv))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
def test_pooled_compaction_into_fresh_blocks_real_sizes(dtype):
    """``compact_pooled_rows_triton`` into fresh destination blocks: 32 layers of 4
    requests of 8k tokens, measured and planned rows, destination table on the device and
    on the host, under sync debug mode "error": byte-equal to the reference with the same
    destinations (same tables), and no block of the table's rows (sources) changes in any
    layer tensor. bf16 and fp8 caches."""
    from vllm_adakv.kernels.compaction import compact_pooled_rows_reference
    from vllm_adakv.kernels.triton_compaction import compact_pooled_rows_triton

    lengths = [8192, 8000, 8192, 7900]
    width = 256  # blocks per row: far more than the kept pages need (asserted below)
    table, kv, layer_bases, masks = _pooled_setup(lengths, seed=3, fresh_blocks=4 * width,
                                                  dtype=dtype)
    first = int(table.max()) + 1
    dst = (first + torch.randperm(4 * width)).view(4, width).to(torch.int32)
    block_rows = [2, 0, 3, 1]
    masks = masks[torch.tensor(block_rows)]
    pages = (masks.sum(3) + BS - 1) // BS
    need = [max(1, -(-int(p.sum()) // (POOL_LAYERS * POOL_HEADS))) for p in pages]
    assert max(need) + 3 <= width
    dim = POOL_DIM
    bases = layer_bases.tolist()
    for kept_blocks, dst_blocks in (([None] * 4, dst.to(DEV)),
                                    ([need[0], need[1] + 3, None, need[3]], dst)):
        got_kv, want_kv = kv.clone(), kv.clone()
        want = compact_pooled_rows_reference(want_kv[..., :dim], want_kv[..., dim:], table,
                                             block_rows, masks, layer_bases, kept_blocks,
                                             dst_blocks=dst.to(DEV))
        got = _sync_free(compact_pooled_rows_triton, got_kv[..., :dim], got_kv[..., dim:],
                         table, block_rows, masks, layer_bases, kept_blocks,
                         dst_blocks=dst_blocks)
        for name, g, w in zip(("page_start", "counts", "chunk_layer", "kept_blocks"), got,
                              want, strict=True):
            assert g.is_cuda and g.dtype == torch.int32, name
            assert torch.equal(g, w.to(DEV)), name
        assert torch.equal(_bytes(got_kv), _bytes(want_kv))
        for base in bases:  # block ids below ``first``: the table's, never destinations
            assert torch.equal(_bytes(got_kv[base:base + first]), _bytes(kv[base:base + first]))
        del got_kv, want_kv
        torch.cuda.empty_cache()


def test_pooled_decode_real_sizes():
    """The decode over chunk tables at every layer of 4 pooled 8k requests, with and
    without split-K (equal, by tokens, balanced), and replayed from a CUDA graph whose
    tables were filled after the capture (the kernel reads them on the device; the
    balanced splits are chosen from them at replay)."""
    from vllm_adakv.kernels.triton_compaction import compact_pooled_rows_triton

    lengths = [8192, 8000, 8192, 7900]
    seq = [n + int(torch.randint(1, 40, ())) for n in lengths]
    table, kv, layer_bases, masks = _pooled_setup(seq)
    for r, n in enumerate(lengths):
        masks[r, :, :, n:] = False
    dim, heads = POOL_DIM, POOL_HEADS
    kc, vc = kv[..., :dim], kv[..., dim:]
    starts, counts, chunk_layer, kept = compact_pooled_rows_triton(
        kc, vc, table, [0, 1, 2, 3], masks, layer_bases, [None] * 4)
    num_slots = 6
    slots = torch.tensor([4, 0, 5, 2])
    start_tab = torch.zeros(num_slots, POOL_LAYERS, heads, dtype=torch.int32, device=DEV)
    count_tab = torch.zeros_like(start_tab)
    chunk_tab = torch.zeros(num_slots, POOL_LAYERS, dtype=torch.int32, device=DEV)
    cap_tab = torch.ones(num_slots, dtype=torch.int32, device=DEV)
    start_tab[slots], count_tab[slots] = starts, counts
    chunk_tab[slots] = layer_bases[chunk_layer.long()]
    cap_tab[slots] = kept * heads
    q_lens = torch.tensor([1, 3, 1, 1])
    qsl = torch.cat([torch.zeros(1, dtype=torch.int64), q_lens.cumsum(0)])
    n_tok = int(qsl[-1])
    query = torch.randn(n_tok + 2, POOL_Q_HEADS, dim, device=DEV).to(torch.bfloat16)
    picked = torch.tensor([2, 0, 3, 1])
    rows = row_table(picked, slots[picked], qsl[:-1], qsl[1:], torch.tensor(lengths)[picked],
                     torch.tensor(seq)[picked]).to(DEV)
    common = dict(block_table=table, rows=rows, num_row_tokens=n_tok, scale=dim**-0.5,
                  chunk_base=chunk_tab, capacity=cap_tab)
    for layer in range(POOL_LAYERS):
        args = dict(query=query, key_cache=kc, value_cache=vc,
                    page_start=start_tab[:, layer], kept_counts=count_tab[:, layer],
                    layer_base=int(layer_bases[layer]), **common)
        want = torch.full(query.shape, float("nan"), device=DEV)
        headwise_attention_ranges_reference(**args, out=want)
        for options in ({"num_splits": 1}, {}, {"num_splits": 4}, {"balance_splits": 4}):
            out = torch.full_like(query, float("nan"))
            headwise_attention_ranges_triton(**args, out=out, **options)
            assert not torch.isnan(out[:n_tok]).any() and torch.isnan(out[n_tok:]).all()
            torch.testing.assert_close(out[:n_tok].float(), want[:n_tok], rtol=2e-2,
                                       atol=2e-2)
    # CUDA graph: tables captured empty, filled afterwards, as the engine's persistent ones.
    layer = 5
    g_start, g_count = torch.zeros_like(start_tab[:, layer]), torch.zeros_like(count_tab[:, 0])
    g_chunk, g_cap = torch.zeros_like(chunk_tab), torch.ones_like(cap_tab)
    out = torch.full_like(query, float("nan"))
    graph_args = dict(query=query, key_cache=kc, value_cache=vc, page_start=g_start,
                      kept_counts=g_count, block_table=table, rows=rows, num_row_tokens=n_tok,
                      scale=dim**-0.5, out=out, chunk_base=g_chunk, capacity=g_cap,
                      layer_base=int(layer_bases[layer]))
    out_balanced = torch.full_like(query, float("nan"))
    balanced_args = {**graph_args, "out": out_balanced, "balance_splits": 4}
    headwise_attention_ranges_triton(**graph_args)  # compiled outside the capture
    headwise_attention_ranges_triton(**balanced_args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        headwise_attention_ranges_triton(**graph_args)
        headwise_attention_ranges_triton(**balanced_args)
    g_start.copy_(start_tab[:, layer])
    g_count.copy_(count_tab[:, layer])
    g_chunk.copy_(chunk_tab)
    g_cap.copy_(cap_tab)
    graph.replay()
    want = torch.full(query.shape, float("nan"), device=DEV)
    headwise_attention_ranges_reference(
        query, kc, vc, start_tab[:, layer], count_tab[:, layer], out=want,
        layer_base=int(layer_bases[layer]), **common)
    torch.testing.assert_close(out[:n_tok].float(), want[:n_tok], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out_balanced[:n_tok].float(), want[:n_tok], rtol=2e-2,
                               atol=2e-2)


def test_pooled_compaction_never_waits_for_the_gpu():
    """All 32 layers of 4 requests compacted at once under sync debug mode "error": the
    layer order, page starts and capacity check stay on the device (layer bases given on
    the host and on the device, kept blocks planned and not)."""
    from vllm_adakv.kernels.triton_compaction import compact_pooled_rows_triton

    lengths = [8192, 6000, 8192, 4000]
    table, kv, layer_bases, masks = _pooled_setup(lengths, seed=1)
    host_bases = layer_bases.cpu()
    pages = (masks.sum(3) + BS - 1) // BS
    need = [max(1, -(-int(p.sum()) // (POOL_LAYERS * POOL_HEADS))) for p in pages]
    dim = POOL_DIM
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        first = compact_pooled_rows_triton(kv[..., :dim], kv[..., dim:], table, [0, 1, 2, 3],
                                           masks, host_bases, [None] * 4)
        second = compact_pooled_rows_triton(kv[..., :dim], kv[..., dim:], table,
                                            [0, 1, 2, 3], masks, layer_bases,
                                            [need[0] + 1, None, need[2], need[3]])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert first[3].tolist() == need
    assert second[3].tolist() == [need[0] + 1, need[1], need[2], need[3]]
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])


# fp8 KV caches (vLLM's --kv-cache-dtype fp8: float8_e4m3fn on CUDA; element = fp8 value *
# the layer's scale, a 0-dim float32 device tensor). References in float64 on the
# dequantized caches (fp8 -> float64 * scale).

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
FP8_IDS = ["e4m3fn", "e5m2"]


def _scale() -> torch.Tensor:
    """A random non-trivial per-layer scale, as vLLM holds it."""
    return (0.05 + 0.6 * torch.rand((), device=DEV)).float()


def _fp8_paged(lengths: list[int], heads: int, dim: int, fp8: torch.dtype):
    """fp8 key and value caches holding random tokens at each request's positions and NaN
    elsewhere (written through uint8 views), and the block table on the device."""
    table, nb = random_block_tables(lengths, BS)
    table = table.to(DEV)
    kc = torch.full((nb, heads, BS, dim), float("nan"), device=DEV).to(fp8)
    vc = kc.clone()
    for r, n in enumerate(lengths):
        keys = torch.randn(n, heads, dim, device=DEV).to(fp8)
        values = torch.randn(n, heads, dim, device=DEV).to(fp8)
        write_tokens(_bytes(kc), _bytes(vc), table[r], torch.arange(n, device=DEV),
                     _bytes(keys), _bytes(values))
    return kc, vc, table


def _dequantized(cache: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return cache.double() * scale.double()


@pytest.mark.parametrize("fp8", FP8, ids=FP8_IDS)
@pytest.mark.parametrize("length", [8192, 32768])
@pytest.mark.parametrize("q_heads,kv_heads,dim", [(32, 8, 128), (8, 8, 64)])
def test_scoring_fp8_real_sizes(length, q_heads, kv_heads, dim, fp8):
    kc, _, table = _fp8_paged([length], kv_heads, dim, fp8)
    window = 32
    q = (torch.randn(window, q_heads, dim, device=DEV) * 2).to(torch.bfloat16)
    k_scale = _scale()
    kw = dict(gqa_reduce="mean", pooling="max", pool_kernel=7)
    got = score_window_triton(q, kc, table[0], length, dim**-0.5, k_scale=k_scale, **kw)
    want = score_window_reference(q.double(), _dequantized(kc, k_scale), table[0], length,
                                  dim**-0.5, **kw)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("fp8", FP8, ids=FP8_IDS)
def test_voter_probs_fp8_real_sizes(fp8):
    """GVote's voter attention over an fp8 cache, under sync debug mode "error" (the scale
    is read on the device) == the float64 reference on the dequantized keys."""
    from vllm_adakv import kernels
    from vllm_adakv.kernels.voting import voter_probs_reference
    from vllm_adakv.methods.gvote import gvote_voters

    lengths, heads, q_heads, dim = [2048, 8192, 700], 8, 32, 128
    kc, _, table = _fp8_paged(lengths, heads, dim, fp8)
    wq = (torch.randn(len(lengths), 32, q_heads, dim, device=DEV) * 2).to(torch.bfloat16)
    voters = gvote_voters(wq, 8, 3, 5)
    k_scale = _scale()
    rows = list(range(len(lengths)))
    got = _sync_free(kernels.voter_probs, voters, kc, table, rows, lengths, dim**-0.5,
                     k_scale=k_scale)
    want = voter_probs_reference(voters.double(), _dequantized(kc, k_scale), table, rows,
                                 lengths, dim**-0.5)
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("fp8", FP8, ids=FP8_IDS)
@pytest.mark.parametrize("group,dim", [(4, 128), (1, 64), (8, 128)])
def test_range_decode_fp8_real_sizes(group, dim, fp8):
    """32 rows of 1.5k-2.5k compacted tokens plus a tail over fp8 caches with random scales,
    bf16 queries (a few rows with several tokens): the fp32 reference and the kernel (one
    split, the default, balanced) == the float64 reference on the dequantized caches; then
    replayed from a CUDA graph after the scales changed in place (read at each replay)."""
    heads, rows = 8 if group < 8 else 4, 32
    lengths = [int(x) for x in torch.randint(1500, 2500, (rows,))]
    seq = [n + int(torch.randint(1, 40, ())) for n in lengths]
    table, nb = random_block_tables(seq, BS)
    table = table.to(DEV)
    kc = torch.randn(nb, heads, BS, dim, device=DEV).to(fp8)
    vc = torch.randn(nb, heads, BS, dim, device=DEV).to(fp8)
    starts = torch.zeros(rows, heads, dtype=torch.int32, device=DEV)
    counts = torch.zeros_like(starts)
    for r, n in enumerate(lengths):
        budget = torch.randint(0, n // 2, (heads,), device=DEV)
        keep = torch.rand(heads, n, device=DEV).argsort(1) < budget[:, None]
        keep[:, n - 32:] = True
        starts[r], counts[r] = compact_ranges_reference(kc, vc, table[r], keep, n // BS)
    q_lens = torch.ones(rows, dtype=torch.int64)
    q_lens[:3] = torch.tensor([4, 2, 7])
    qsl = torch.cat([torch.zeros(1, dtype=torch.int64), q_lens.cumsum(0)])
    n_tok = int(qsl[-1])
    query = torch.randn(n_tok + 3, heads * group, dim, device=DEV).to(torch.bfloat16)
    idx = torch.arange(rows)
    rows_t = row_table(idx, idx, qsl[:-1], qsl[1:], torch.tensor(lengths),
                       torch.tensor(seq)).to(DEV)
    args = dict(query=query, key_cache=kc, value_cache=vc, page_start=starts,
                kept_counts=counts, block_table=table, rows=rows_t, num_row_tokens=n_tok,
                scale=dim**-0.5)
    k_scale, v_scale = _scale(), _scale()

    def wanted() -> torch.Tensor:
        want = torch.full(query.shape, float("nan"), dtype=torch.float64, device=DEV)
        headwise_attention_ranges_reference(
            **dict(args, query=query.double(), key_cache=_dequantized(kc, k_scale),
                   value_cache=_dequantized(vc, v_scale)), out=want)
        return want[:n_tok]

    want = wanted()
    ref = torch.full(query.shape, float("nan"), device=DEV)
    headwise_attention_ranges_reference(**args, out=ref, k_scale=k_scale, v_scale=v_scale)
    torch.testing.assert_close(ref[:n_tok].double(), want, rtol=1e-4, atol=1e-4)
    for options in ({"num_splits": 1}, {}, {"balance_splits": 4},
                    {"balance_splits": 8, "balance_min_iters": 1}):
        out = torch.full_like(query, float("nan"))
        headwise_attention_ranges_triton(**args, out=out, k_scale=k_scale, v_scale=v_scale,
                                         **options)
        assert not torch.isnan(out[:n_tok]).any() and torch.isnan(out[n_tok:]).all()
        torch.testing.assert_close(out[:n_tok].double(), want, rtol=2e-2, atol=2e-2)
    out = torch.full_like(query, float("nan"))
    headwise_attention_ranges_triton(**args, out=out, k_scale=k_scale, v_scale=v_scale)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        headwise_attention_ranges_triton(**args, out=out, k_scale=k_scale, v_scale=v_scale)
    k_scale.mul_(1.5)
    v_scale.mul_(0.5)
    graph.replay()
    torch.testing.assert_close(out[:n_tok].double(), wanted(), rtol=2e-2, atol=2e-2)
