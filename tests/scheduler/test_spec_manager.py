"""CompressedAttentionSpec and CompressedKVManager against vLLM's real registry and BlockPool."""

from __future__ import annotations

import dataclasses
import pickle
import random

import pytest
import torch

pytest.importorskip("vllm.v1.core.block_pool")

from vllm.v1.core.block_pool import BlockPool  # noqa: E402
from vllm.v1.core.single_type_kv_cache_manager import (  # noqa: E402
    FullAttentionManager,
    SlidingWindowManager,
)
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec  # noqa: E402
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry  # noqa: E402

from vllm_adakv.config import KVCompressionConfig  # noqa: E402
from vllm_adakv.memory import plan_compression  # noqa: E402
from vllm_adakv.protocol import CompressedAttentionSpec  # noqa: E402
from vllm_adakv.scheduler.manager import CompressedKVManager, register_spec  # noqa: E402

SNAPKV = KVCompressionConfig(method="snapkv", budget=64, window=8)
ADAKV = KVCompressionConfig(method="adakv", budget=64, window=8)


def _base(**kw) -> FullAttentionSpec:
    return FullAttentionSpec(block_size=kw.pop("block_size", 32),
                             num_kv_heads=kw.pop("num_kv_heads", 2), head_size=32,
                             dtype=torch.float32, **kw)


def _wrapped(compression=SNAPKV, num_layers=4, **kw) -> CompressedAttentionSpec:
    return CompressedAttentionSpec.wrap(_base(**kw), compression, num_layers)


# ------------------------------------------------------------------ spec


@pytest.mark.parametrize("extra", [
    {},
    {"head_size_v": 16, "dcp_sharded": False, "page_size_padded": 20_000},
    {"block_size": 16, "num_kv_heads": 8, "non_causal": True},
])
def test_wrap_keeps_every_base_field(extra):
    base = _base(**extra)
    spec = CompressedAttentionSpec.wrap(base, ADAKV, 7)
    assert isinstance(spec, CompressedAttentionSpec) and isinstance(spec, FullAttentionSpec)
    for f in dataclasses.fields(FullAttentionSpec):
        assert getattr(spec, f.name) == getattr(base, f.name), f.name
    assert spec.compression == ADAKV and spec.num_layers == 7
    assert spec.page_size_bytes == base.page_size_bytes
    assert spec.block_size == base.block_size and spec.num_kv_heads == base.num_kv_heads


def test_page_size_matches_base_spec():
    base = _base()
    assert _wrapped().page_size_bytes == base.page_size_bytes == 2 * 32 * 2 * 32 * 4


def test_defaults_are_compression_off():
    spec = CompressedAttentionSpec(block_size=16, num_kv_heads=1, head_size=8,
                                   dtype=torch.float32)
    assert spec.compression == KVCompressionConfig() and spec.num_layers == 1
    assert spec.plan(100_000) is None


def test_merge_equal_specs():
    a, b = _wrapped(), _wrapped()
    merged = CompressedAttentionSpec.merge([a, b, a])
    assert type(merged) is CompressedAttentionSpec
    assert merged == a
    assert merged.compression == SNAPKV and merged.num_layers == 4


@pytest.mark.parametrize("other", [
    _wrapped(compression=ADAKV),
    _wrapped(compression=KVCompressionConfig(method="snapkv", budget=128, window=8)),
    _wrapped(num_layers=5),
])
def test_merge_with_different_compression_raises(other):
    with pytest.raises(ValueError, match="disagree"):
        CompressedAttentionSpec.merge([_wrapped(), other])


def test_merge_with_plain_spec_raises():
    with pytest.raises(ValueError, match="uncompressed"):
        CompressedAttentionSpec.merge([_wrapped(), _base()])


def test_pickle_round_trip():
    spec = _wrapped(compression=ADAKV, num_layers=12)
    for proto in range(2, pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(spec, protocol=proto))
        assert back == spec and type(back) is CompressedAttentionSpec
        assert hash(back) == hash(spec)
        assert back.plan(1000) == spec.plan(1000)


def test_plan_uses_spec_geometry():
    spec = _wrapped(compression=ADAKV, num_layers=3, block_size=16, num_kv_heads=8)
    assert spec.plan(777) == plan_compression(ADAKV, 777, 8, 16, 3)


# ------------------------------------------------------------------ registry


def test_register_spec_twice_keeps_builtins():
    register_spec()
    register_spec()
    assert KVCacheSpecRegistry.get_manager_class(_wrapped()) is CompressedKVManager
    assert KVCacheSpecRegistry.get_manager_class(_base()) is FullAttentionManager
    swa = SlidingWindowSpec(block_size=32, num_kv_heads=2, head_size=32, dtype=torch.float32,
                            sliding_window=128)
    assert KVCacheSpecRegistry.get_manager_class(swa) is SlidingWindowManager
    assert KVCacheSpecRegistry.get_uniform_type_base_spec(_wrapped()) is FullAttentionSpec


# ------------------------------------------------------------------ manager

BS = 32


def _manager(spec: CompressedAttentionSpec, num_blocks: int = 512, caching: bool = False):
    pool = BlockPool(num_gpu_blocks=num_blocks, enable_caching=caching,
                     hash_block_size=spec.block_size)
    manager = CompressedKVManager(spec, block_pool=pool, enable_caching=caching,
                                  kv_cache_group_id=0, scheduler_block_size=spec.block_size)
    return manager, pool


def _ids(manager, req):
    return [b.block_id for b in manager.req_to_blocks[req]]


def _check_release(manager, pool, req, prompt_len, plan):
    """Run the prefill-complete sequence; return the blocks before release."""
    null = pool.null_block
    before = list(manager.req_to_blocks[req])
    free0, total0 = pool.get_num_free_blocks(), manager.num_released_blocks_total

    manager.remove_skipped_blocks(req, prompt_len - 1, num_prompt_tokens=prompt_len)
    manager.remove_skipped_blocks(req, prompt_len, num_prompt_tokens=None)
    assert manager.req_to_blocks[req] == before
    assert pool.get_num_free_blocks() == free0

    manager.remove_skipped_blocks(req, prompt_len, num_prompt_tokens=prompt_len)
    after = manager.req_to_blocks[req]
    assert len(after) == len(before)
    assert pool.get_num_free_blocks() - free0 == plan.released_blocks
    assert manager.num_released_blocks_total - total0 == plan.released_blocks
    for i, (old, new) in enumerate(zip(before, after, strict=True)):
        if plan.kept_blocks <= i < plan.tail_block:
            assert new is null, i
        else:
            assert new is old and not new.is_null, i

    snapshot = list(after)
    for processed in (prompt_len, prompt_len + 1, prompt_len + 500):
        manager.remove_skipped_blocks(req, processed, num_prompt_tokens=prompt_len)
    assert manager.req_to_blocks[req] == snapshot
    assert pool.get_num_free_blocks() - free0 == plan.released_blocks
    assert manager.num_released_blocks_total - total0 == plan.released_blocks
    return before


@pytest.mark.parametrize("compression", [SNAPKV, ADAKV,
                                         KVCompressionConfig(method="pyramidkv", budget=64,
                                                             window=8),
                                         KVCompressionConfig(method="streamingllm",
                                                             budget=64, window=8)])
@pytest.mark.parametrize("prompt_len", [500, 512, 513, 1000])
def test_release_after_prefill(compression, prompt_len):
    spec = _wrapped(compression=compression)
    plan = spec.plan(prompt_len)
    assert plan is not None and plan.released_blocks >= 1
    manager, pool = _manager(spec)
    start = pool.get_num_free_blocks()
    new = manager.allocate_new_blocks("r", prompt_len, prompt_len)
    assert len(new) == -(-prompt_len // BS)
    _check_release(manager, pool, "r", prompt_len, plan)

    # Decode keeps growing the block list after the nulled range.
    manager.allocate_new_blocks("r", prompt_len + 3 * BS, prompt_len + 3 * BS)
    assert len(manager.req_to_blocks["r"]) == -(-(prompt_len + 3 * BS) // BS)
    assert pool.get_num_free_blocks() == (
        start - len(manager.req_to_blocks["r"]) + plan.released_blocks
    )

    manager.free("r")
    assert pool.get_num_free_blocks() == start
    assert "r" not in manager.req_to_blocks


@pytest.mark.parametrize("prompt_len", [10, 64, 65, 80, 95])
def test_incompressible_prompt_frees_nothing(prompt_len):
    spec = _wrapped()  # snapkv budget 64, block 32: keeps 2 blocks; L < 96 has tail_block <= 2
    assert spec.plan(prompt_len) is None
    manager, pool = _manager(spec)
    start = pool.get_num_free_blocks()
    manager.allocate_new_blocks("r", prompt_len, prompt_len)
    before = list(manager.req_to_blocks["r"])
    free0 = pool.get_num_free_blocks()
    for processed in (prompt_len - 1, prompt_len, prompt_len + 40):
        manager.remove_skipped_blocks("r", processed, num_prompt_tokens=prompt_len)
    assert manager.req_to_blocks["r"] == before
    assert pool.get_num_free_blocks() == free0
    assert manager.num_released_blocks_total == 0
    manager.free("r")
    assert pool.get_num_free_blocks() == start


def test_compression_off_frees_nothing():
    spec = _wrapped(compression=KVCompressionConfig())
    manager, pool = _manager(spec)
    manager.allocate_new_blocks("r", 4000, 4000)
    free0 = pool.get_num_free_blocks()
    manager.remove_skipped_blocks("r", 4000, num_prompt_tokens=4000)
    assert pool.get_num_free_blocks() == free0 and manager.num_released_blocks_total == 0


def test_requests_are_independent():
    spec = _wrapped()
    manager, pool = _manager(spec)
    start = pool.get_num_free_blocks()
    lens = {"a": 700, "b": 95, "c": 1200}
    assert spec.plan(95) is None
    for req, n in lens.items():
        manager.allocate_new_blocks(req, n, n)
    untouched = {req: list(manager.req_to_blocks[req]) for req in lens}
    plan_a = spec.plan(700)
    _check_release(manager, pool, "a", 700, plan_a)
    assert manager.req_to_blocks["b"] == untouched["b"]
    assert manager.req_to_blocks["c"] == untouched["c"]
    plan_c = spec.plan(1200)
    _check_release(manager, pool, "c", 1200, plan_c)
    assert manager.num_released_blocks_total == plan_a.released_blocks + plan_c.released_blocks
    manager.remove_skipped_blocks("b", 95, num_prompt_tokens=95)  # plan None
    assert manager.req_to_blocks["b"] == untouched["b"]
    for req in lens:
        manager.free(req)
    assert pool.get_num_free_blocks() == start


@pytest.mark.parametrize("via_pop", [False, True])
def test_preempted_request_is_released_again(via_pop):
    spec = _wrapped(compression=ADAKV)
    plan = spec.plan(900)
    manager, pool = _manager(spec)
    start = pool.get_num_free_blocks()
    for round_ in range(3):
        manager.allocate_new_blocks("r", 900, 900)
        assert all(not b.is_null for b in manager.req_to_blocks["r"]), round_
        _check_release(manager, pool, "r", 900, plan)
        if via_pop:  # the coordinator's path: pop, then free through the pool
            pool.free_blocks(reversed(manager.pop_blocks_for_free("r")))
        else:
            manager.free("r")
        assert pool.get_num_free_blocks() == start, round_
    assert manager.num_released_blocks_total == 3 * plan.released_blocks


def test_chunked_prefill_releases_only_when_prompt_done():
    spec = _wrapped()
    plan = spec.plan(1000)
    manager, pool = _manager(spec)
    free_start = pool.get_num_free_blocks()
    for done in (256, 512, 768):
        manager.allocate_new_blocks("r", done, done)
        manager.remove_skipped_blocks("r", done, num_prompt_tokens=1000)
        assert manager.num_released_blocks_total == 0
        assert all(not b.is_null for b in manager.req_to_blocks["r"])
    manager.allocate_new_blocks("r", 1000, 1000)
    _check_release(manager, pool, "r", 1000, plan)
    manager.free("r")
    assert pool.get_num_free_blocks() == free_start


def test_random_sweep_with_real_block_pool():
    seed = random.SystemRandom().randrange(2**31)
    r = random.Random(seed)
    for _ in range(60):
        method = r.choice(["snapkv", "adakv", "pyramidkv", "streamingllm"])
        bs = r.choice([1, 4, 16, 32])
        heads = r.choice([1, 2, 4, 8])
        window = r.randint(1, 32)
        budget = window + r.randint(1, 200)
        layers = r.randint(1, 12)
        sink = min(4, budget - window)
        cfg = KVCompressionConfig(method=method, budget=budget, window=window, sink_tokens=sink)
        spec = _wrapped(compression=cfg, num_layers=layers, block_size=bs, num_kv_heads=heads)
        prompt_len = r.randint(1, 5 * budget + 3 * bs)
        ctx = f"seed={seed} {cfg} L={prompt_len} H={heads} bs={bs} layers={layers}"
        plan = spec.plan(prompt_len)
        manager, pool = _manager(spec, num_blocks=prompt_len // bs + 8)
        start = pool.get_num_free_blocks()
        manager.allocate_new_blocks("q", prompt_len, prompt_len)
        if plan is None:
            free0 = pool.get_num_free_blocks()
            manager.remove_skipped_blocks("q", prompt_len, num_prompt_tokens=prompt_len)
            assert pool.get_num_free_blocks() == free0, ctx
        else:
            try:
                _check_release(manager, pool, "q", prompt_len, plan)
            except AssertionError as exc:
                raise AssertionError(f"{ctx}: {exc}") from exc
        manager.free("q")
        assert pool.get_num_free_blocks() == start, ctx


# ------------------------------------------------------------------ decode-time compression


@pytest.mark.parametrize("caching", [False, True])
@pytest.mark.parametrize("cfg,prompt_len", [
    (KVCompressionConfig(method="adakv", budget=256, window=8, decode_budget=96,
                         decode_interval=16), 700),
    (KVCompressionConfig(method="snapkv", budget=96, window=16, decode_budget=200,
                         decode_interval=40), 513),
    (KVCompressionConfig(method="streamingllm", budget=64, window=8, decode_budget=64,
                         decode_interval=5), 300),
])
def test_decode_events_hold_what_the_plan_says(cfg, prompt_len, caching):
    """Token by token through 600 generated tokens: after each processed step the request
    holds exactly ``DecodePlan.held_blocks`` blocks that are not null, its head-pages stay
    in ``[0, P)``, every freed block is back in the pool, and freeing it returns all."""
    spec = _wrapped(compression=cfg)
    plan = spec.decode_plan(prompt_len)
    assert plan is not None
    manager, pool = _manager(spec, caching=caching)
    start = pool.get_num_free_blocks()
    assert manager.record_request("r", None, None, prompt_len)
    manager.allocate_new_blocks("r", prompt_len, prompt_len)
    pages = None
    for n in range(600):  # n generated tokens computed: positions [0, L + n) written
        total = prompt_len + n
        if len(manager.req_to_blocks["r"]) < -(-total // BS):
            manager.allocate_new_blocks("r", total, total)
        manager.remove_skipped_blocks("r", total, num_prompt_tokens=prompt_len)
        blocks = manager.req_to_blocks["r"]
        held = sum(not b.is_null for b in blocks)
        assert held == plan.held_blocks(n), n
        assert start - pool.get_num_free_blocks() == held, n
        if pages is None and n > plan.first_event:
            pages = [b.block_id for b in blocks[: plan.page_blocks]]
        if pages is not None:  # events compact into the same entries [0, P)
            assert [b.block_id for b in blocks[: plan.page_blocks]] == pages
    assert manager.num_decode_released_blocks_total > 0
    assert max(plan.held_blocks(n) for n in range(plan.first_event, 600)) <= plan.steady_bound
    manager.free("r")
    assert pool.get_num_free_blocks() == start


def test_decode_reserve_counts_the_bound():
    """--kv-reserve-output with decode compression: a running request's reserve is at most
    the blocks that take it to its plan's bound, not its whole output."""
    cfg = KVCompressionConfig(method="adakv", budget=256, window=8, decode_budget=96,
                              decode_interval=16, reserve_output=4000)
    spec = _wrapped(compression=cfg)
    plan = spec.decode_plan(700)
    manager, pool = _manager(spec)
    manager.record_request("r", None, 4000, 700)
    manager.allocate_new_blocks("r", 700, 700)
    manager.remove_skipped_blocks("r", 700, num_prompt_tokens=700)
    held = sum(not b.is_null for b in manager.req_to_blocks["r"])
    assert manager.reserved_blocks() == plan.max_held - held
    assert manager.reserved_blocks() < -(-4700 // BS) - len(manager.req_to_blocks["r"])
