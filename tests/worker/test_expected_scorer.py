"""The expected scorer in the worker's store: running moments over prefill chunks, the
query Gaussian at future positions, and the selection made from it (CPU, float64 queries
and fresh random inputs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.paged_cache import random_block_tables
from tests.kernels.test_expected import random_table, rotation
from vllm_adakv.config import KVCompressionConfig
from vllm_adakv.kernels.expected import RopeTable, score_expected
from vllm_adakv.memory import plan_compression
from vllm_adakv.methods import get_method
from vllm_adakv.methods.scorers import FIRST_POSITIONS_SKIPPED, FUTURE_POSITIONS
from vllm_adakv.worker.batch import RowPlan, StepPlan
from vllm_adakv.worker.compressor import CompressionStore

BS, HEADS, Q_HEADS, DIM, ROT = 16, 2, 4, 16, 8
LAYER = "model.layers.0.self_attn.attn"


def store_with(cfg: KVCompressionConfig, table: torch.Tensor) -> CompressionStore:
    store = CompressionStore(cfg, (0,), find_rope=lambda name: RopeTable(table, ROT, True))
    store.bind_layers({0: LAYER})
    return store


def chunked(store: CompressionStore, cfg: KVCompressionConfig, query: torch.Tensor,
            length: int, cuts: list[int]) -> RowPlan:
    """Feed one request's prompt queries chunk by chunk; returns its last row."""
    plan = plan_compression(cfg, length, HEADS, BS, 1)
    row = None
    for lo, hi in zip([0, *cuts], [*cuts, length], strict=True):
        row = RowPlan(row=0, req_id="a", prompt_len=length, context_start=lo,
                      query_len=hi - lo, plan=plan)
        store.begin_step(StepPlan(rows=[row], live_req_ids=frozenset({"a"})))
        store.stash_window_queries(row, LAYER, query[lo:hi], 0)
        store.add_query_sums(row, LAYER, query[lo:hi], 0)
    assert row is not None
    return row


@pytest.mark.parametrize("cuts", [[], [37, 70], [2, 3]])
def test_future_moments_of_chunks_are_the_rotated_gaussian_of_the_prompt(cuts):
    gen = torch.Generator().manual_seed(len(cuts))
    length = 90
    table = random_table(length + FUTURE_POSITIONS, ROT, gen)
    query = torch.randn(length, Q_HEADS, DIM, generator=gen, dtype=torch.float64)
    cfg = KVCompressionConfig(method="adakv", budget=40, window=8, scorer="expected")
    store = store_with(cfg, table)
    row = chunked(store, cfg, query, length, cuts)
    mu, sigma = store.future_moments([row], LAYER)
    assert mu.shape == (1, 1, Q_HEADS, DIM) and sigma.shape == (1, Q_HEADS, DIM, DIM)
    # Direct: mean and covariance over p >= FIRST_POSITIONS_SKIPPED of R_p^T q_p, moved by
    # the mean of R_t over the FUTURE_POSITIONS positions after the prompt.
    pre = torch.stack([query[p] @ rotation(table, p, DIM, ROT, True)
                       for p in range(FIRST_POSITIONS_SKIPPED, length)])
    mean = pre.mean(0)
    cov = torch.einsum("nhd,nhe->hde", pre - mean, pre - mean) / len(pre)
    future = sum(rotation(table, t, DIM, ROT, True)
                 for t in range(length, length + FUTURE_POSITIONS)) / FUTURE_POSITIONS
    torch.testing.assert_close(mu[0, 0], mean @ future.T, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sigma[0], future @ cov @ future.T, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["snapkv", "adakv", "pyramidkv"])
def test_selection_reads_the_query_gaussian(method):
    """The kept set is the method's selection from the expected attention of the prompt's
    query Gaussian over the whole prompt, not from the window queries'."""
    gen = torch.Generator().manual_seed(5)
    length = 120
    table = random_table(length + FUTURE_POSITIONS, ROT, gen)
    query = torch.randn(length, Q_HEADS, DIM, generator=gen, dtype=torch.float64)
    block_table, nb = random_block_tables([length], BS)
    keys = torch.randn(nb, HEADS, BS, DIM, generator=gen, dtype=torch.float64)
    masks = {}
    for scorer in ("window", "expected"):
        cfg = KVCompressionConfig(method=method, budget=40, window=8, scorer=scorer)
        store = store_with(cfg, table)
        row = chunked(store, cfg, query, length, [50])
        masks[scorer] = store.keep_masks([row], LAYER, 0, keys, block_table, DIM**-0.5)
    future = store_with(cfg, table)  # the expected scorer's settings
    row = chunked(future, cfg, query, length, [])
    mu, sigma = future.future_moments([row], LAYER)
    raw = score_expected(mu[:, 0], sigma, keys, block_table, [0], [length], DIM**-0.5,
                         gqa_reduce=cfg.gqa_reduce)
    # ... max-pooled over the candidates [0, L - w) only.
    k = cfg.pool_kernel
    scores = F.max_pool1d(raw[:, :, : length - cfg.window], k, stride=1, padding=k // 2)
    budgets = [row.plan.layer_budgets[0]]
    want = get_method(method).select(scores, num_heads=HEADS, prompt_lens=[length],
                                     budgets=budgets, cfg=cfg)
    assert torch.equal(masks["expected"], want)
    assert not torch.equal(masks["expected"], masks["window"])
    assert int(masks["expected"].sum()) == HEADS * budgets[0]


def test_no_rope_is_an_error_naming_the_flag():
    cfg = KVCompressionConfig(method="adakv", budget=40, window=8, scorer="expected")
    store = CompressionStore(cfg, (0,))
    store.bind_layers({0: LAYER})
    row = RowPlan(row=0, req_id="a", prompt_len=60, context_start=0, query_len=10,
                  plan=plan_compression(cfg, 60, HEADS, BS, 1))
    store.begin_step(StepPlan(rows=[row], live_req_ids=frozenset({"a"})))
    with pytest.raises(ValueError, match="--kv-scorer expected needs the model's rotary"):
        store.add_query_sums(row, LAYER, torch.randn(10, Q_HEADS, DIM), 0)


def test_window_scorer_keeps_no_sums():
    cfg = KVCompressionConfig(method="adakv", budget=40, window=8)
    store = CompressionStore(cfg, (0,))  # no rope: never asked for
    store.bind_layers({0: LAYER})
    chunked(store, cfg, torch.randn(60, Q_HEADS, DIM), 60, [30])
    assert store.requests["a"].query_sums == {}


def test_server_scorer_finds_every_rope_at_start():
    """``check_scorer`` (run as the worker builds its compressed group): the server's
    expected scorer looks up every compressed layer's table then; the window scorer none."""
    seen: list[str] = []

    def find(name: str) -> RopeTable:
        seen.append(name)
        return RopeTable(torch.zeros(8, ROT), ROT, True)

    names = {k: f"model.layers.{k}.self_attn.attn" for k in range(3)}
    for scorer, want in (("window", []), ("expected", list(names.values()))):
        cfg = KVCompressionConfig(method="pyramidkv", budget=40, window=8, scorer=scorer)
        store = CompressionStore(cfg, (0, 1, 2), find_rope=find)
        store.bind_layers(names)
        seen.clear()
        store.check_scorer()
        assert seen == want
    missing = CompressionStore(cfg, (0, 1, 2))
    missing.bind_layers(names)
    with pytest.raises(ValueError, match="--kv-scorer expected"):
        missing.check_scorer()

