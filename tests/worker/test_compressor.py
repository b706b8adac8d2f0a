"""The worker's whole compression path of one step, layer by layer, as the backends run it.

``CompressionStore`` stashes each layer's window queries, scores, selects and compacts
every request whose prompt completes (own-tensor plans layer by layer, pooled plans at the
last layer), and ``RangePool.store_compacted`` writes the page ranges decode reads. Here on the CPU
(torch references) against the plan's budgets; ``tests/gpu`` runs the same steps on CUDA
under PyTorch's sync debug mode.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.paged_cache import random_block_tables
from vllm_adakv.config import KVCompressionConfig
from vllm_adakv.memory import plan_compression
from vllm_adakv.tensors import on_device
from vllm_adakv.worker.batch import RowPlan, StepPlan
from vllm_adakv.worker.compressor import CompressionStore, LayerCache
from vllm_adakv.worker.range_pool import RangePool

BS = 16


def run_worker_compression(device: str, method: str, lengths: list[int], *, heads: int = 8,
                           q_heads: int = 32, dim: int = 128, num_layers: int = 3,
                           budget: int = 256, dtype: torch.dtype = torch.float32,
                           sync_debug: bool = False, table: torch.Tensor | None = None,
                           buf: torch.Tensor | None = None, query: torch.Tensor | None = None,
                           k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None, extra: int = 0,
                           output: torch.Tensor | None = None,
                           cache_dtype: torch.dtype | None = None):
    """One step that completes every prompt of ``lengths``, through all layers; returns
    the plans, the range pool and the store. ``table``, ``buf`` (``[layers * nb, H, BS,
    2 * dim]``, all layers' caches), ``query`` (``[tokens, q_heads, dim]``): given, or
    random (of ``cache_dtype``, None: ``dtype``); ``k_scale`` / ``v_scale``: an fp8
    ``buf``'s scales, as the backends pass them. ``extra``: tokens past each prompt in
    the same step (a request recomputed after preemption), their attention written into
    ``output`` at every layer before a pooled plan's compaction (``serve_uncompacted``, as
    the backends run it)."""
    cfg = KVCompressionConfig(method=method, budget=budget)
    if table is None:
        table, nb = random_block_tables([n + extra for n in lengths], BS)
    if buf is not None:
        nb = buf.shape[0] // num_layers
    table = table.to(device)
    if buf is None:
        buf = torch.randn(num_layers * nb, heads, BS, 2 * dim, device=device).to(
            cache_dtype or dtype)
    bases = on_device([k * nb for k in range(num_layers)], torch.int32, device)
    names = {k: f"model.layers.{k}.self_attn.attn" for k in range(num_layers)}
    store = CompressionStore(cfg, tuple(range(num_layers)))
    store.bind_layers(names)
    plans = [plan_compression(cfg, n, heads, BS, num_layers) for n in lengths]
    rows = [RowPlan(row=i, req_id=f"r{i}", prompt_len=n, context_start=0, query_len=n + extra,
                    plan=plans[i]) for i, n in enumerate(lengths)]
    starts = [sum(lengths[:i]) + extra * i for i in range(len(lengths))]
    qsl = [*starts, sum(lengths) + extra * len(lengths)]
    if query is None:
        query = torch.randn(qsl[-1], q_heads, dim, device=device).to(dtype)
    pool = RangePool(len(lengths) + 1, num_layers, heads, device=device)
    store.begin_step(StepPlan(rows=rows, live_req_ids=frozenset(r.req_id for r in rows)))
    if device != "cpu":
        torch.cuda.synchronize()
    if sync_debug:
        torch.cuda.set_sync_debug_mode("error")
    try:
        for k in range(num_layers):
            layer = buf[k * nb:(k + 1) * nb]
            cache = LayerCache(key=layer[..., :dim], value=layer[..., dim:],
                               all_key=buf[..., :dim], all_value=buf[..., dim:],
                               base=k * nb, layer_bases=bases, k_scale=k_scale,
                               v_scale=v_scale)
            for row in rows:
                store.stash_window_queries(row, names[k], query, starts[row.row])
            def serve(k=k, cache=cache) -> None:
                store.serve_uncompacted(rows, k, query, output[k], cache, table, qsl,
                                        dim**-0.5)

            pool.store_compacted(store.compress_rows(rows, names[k], k, cache, table, dim**-0.5,
                                                     after_selection=serve if extra else None))
    finally:
        if sync_debug:
            torch.cuda.set_sync_debug_mode(0)
    return plans, pool, store


def check_kept(plans, pool: RangePool, store: CompressionStore, heads: int) -> None:
    """Every layer of every request keeps its layer budget per head on average, and each
    request's counts reached the metrics (page usage) once all its layers were done."""
    for i, plan in enumerate(plans):
        slot = pool.slot(f"r{i}")
        kept = pool.kept_counts[slot].sum(1).tolist()
        assert kept == [heads * b for b in plan.layer_budgets], (i, kept)
    assert sorted(store.page_usage) == [f"r{i}" for i in range(len(plans))]


@pytest.mark.parametrize("method", ["adakv", "pyramidkv"])  # own tensors, pooled
def test_one_step_compresses_every_layer_of_every_request(method: str) -> None:
    plans, pool, store = run_worker_compression("cpu", method, [700, 1000], heads=2,
                                                q_heads=4, dim=16)
    assert [p.pooled for p in plans] == [method == "pyramidkv"] * 2
    check_kept(plans, pool, store, heads=2)


@pytest.mark.parametrize("fmt", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("method", ["snapkv", "adakv", "pyramidkv", "gvote", "streamingllm"])
def test_fp8_cache_compresses_as_its_dequantized_values(method: str, fmt: torch.dtype) -> None:
    """A step on an fp8 cache with its layer scales (``LayerCache.k_scale`` / ``v_scale``,
    as the backends pass them) keeps, compacts and serves exactly what the same step does
    on a float32 cache holding the dequantized values: the scales reach the scoring, the
    vote and the masked prompt attention of resumed pooled rows."""
    heads, q_heads, dim, layers, extra = 2, 4, 16, 3, 5
    lengths = [700, 1000]
    gen = torch.Generator().manual_seed(0)
    table, nb = random_block_tables([n + extra for n in lengths], BS)
    raw = (torch.randn(layers * nb, heads, BS, 2 * dim, generator=gen) * 3).to(fmt)
    k_scale = torch.tensor([0.37])  # vLLM's are 0-dim: both shapes are one element
    v_scale = torch.tensor(1.9)
    deq = raw.float()
    deq[..., :dim] *= k_scale
    deq[..., dim:] *= v_scale
    query = torch.randn(sum(lengths) + extra * len(lengths), q_heads, dim, generator=gen)
    outs = {}
    results = {}
    for name, buf, scales in [("fp8", raw.clone(), (k_scale, v_scale)),
                              ("float32", deq.clone(), (None, None))]:
        outs[name] = torch.full((layers, *query.shape), float("nan"))
        plans, pool, store = run_worker_compression(
            "cpu", method, lengths, heads=heads, q_heads=q_heads, dim=dim, num_layers=layers,
            budget=128, table=table, buf=buf, query=query, k_scale=scales[0],
            v_scale=scales[1], extra=extra, output=outs[name])
        results[name] = (buf, pool)
    (fp8_buf, fp8_pool), (ref_buf, ref_pool) = results["fp8"], results["float32"]
    assert torch.equal(fp8_pool.page_start, ref_pool.page_start)
    assert torch.equal(fp8_pool.kept_counts, ref_pool.kept_counts)
    got = fp8_buf.float()
    got[..., :dim] *= k_scale
    got[..., dim:] *= v_scale
    assert torch.equal(got, ref_buf)  # compaction moved the same tokens
    if plans[0].pooled:  # resumed rows served before the pooled compaction, every layer
        assert not outs["float32"].isnan().all()
        torch.testing.assert_close(outs["fp8"], outs["float32"], equal_nan=True)
    if method != "gvote":  # measured: keeps what the vote keeps, not the budget
        check_kept(plans, fp8_pool, store, heads)
