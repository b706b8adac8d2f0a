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
                           sync_debug: bool = False):
    """One step that completes every prompt of ``lengths``, through all layers; returns
    the plans, the range pool and the store."""
    cfg = KVCompressionConfig(method=method, budget=budget)
    table, nb = random_block_tables(lengths, BS)
    table = table.to(device)
    buf = torch.randn(num_layers * nb, heads, BS, 2 * dim, device=device).to(dtype)
    bases = on_device([k * nb for k in range(num_layers)], torch.int32, device)
    names = {k: f"model.layers.{k}.self_attn.attn" for k in range(num_layers)}
    store = CompressionStore(cfg, tuple(range(num_layers)))
    store.bind_layers(names)
    plans = [plan_compression(cfg, n, heads, BS, num_layers) for n in lengths]
    rows = [RowPlan(row=i, req_id=f"r{i}", prompt_len=n, context_start=0, query_len=n,
                    plan=plans[i]) for i, n in enumerate(lengths)]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    query = torch.randn(sum(lengths), q_heads, dim, device=device).to(dtype)
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
                               base=k * nb, layer_bases=bases)
            for row in rows:
                store.stash_window_queries(row, names[k], query, starts[row.row])
            pool.store_compacted(store.compress_rows(rows, names[k], k, cache, table,
                                                     dim**-0.5))
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
