"""CompressedKVManager with prefix caching on, against vLLM's real caching BlockPool.

Driven as ``KVCacheManager.allocate_slots`` drives a single-type manager: release
(``remove_skipped_blocks`` on the processed tokens), count, take prefix hits, allocate,
hash (``cache_blocks``). Compressed requests compact into fresh targets, leave their
full prompt blocks hashed and intact in the pool, and never hash their tail.
"""

from __future__ import annotations

import random

import pytest

pytest.importorskip("vllm.v1.core.block_pool")

from tests.scheduler.test_spec_manager import BS, _manager, _wrapped  # noqa: E402
from vllm_adakv.config import KVCompressionConfig  # noqa: E402
from vllm_adakv.overrides import overrides_of  # noqa: E402


def _request(request_id: str, ids: list[int], extra_args: dict | None = None):
    """A vLLM Request with block hashes, as the engine core makes it with prefix caching."""
    from vllm import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    hash_fn = get_hash_fn_by_name("sha256")
    init_none_hash(hash_fn)
    return Request(request_id, ids, SamplingParams(max_tokens=8, extra_args=extra_args), None,
                   block_hasher=get_request_block_hasher(BS, hash_fn))


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


def _admit(manager, req, extra_args=None) -> bool:
    return manager.record_request(req.request_id, extra_args, 8, req.num_prompt_tokens)


def _hit(manager, pool, req) -> list:
    """The cached blocks of the longest prefix of ``req`` within its hit cap."""
    cap = manager.hit_cap(req)
    limit = req.num_tokens - 1 if cap is None else cap
    blocks = []
    for h in req.block_hashes[: limit // BS]:
        cached = pool.get_cached_block(h, [0])
        if cached is None:
            break
        blocks.append(cached[0])
    return blocks


def _step(manager, req, processed: int, upto: int, hit: list | None = None) -> int:
    """One allocation as ``allocate_slots`` makes it; returns the blocks it counted."""
    rid = req.request_id
    hit = hit or []
    computed = len(hit) * BS
    manager.remove_skipped_blocks(rid, processed, num_prompt_tokens=req.num_prompt_tokens)
    need = manager.get_num_blocks_to_allocate(rid, upto, hit, max(computed, processed),
                                              max(computed, processed), upto)
    if hit:
        manager.add_local_computed_blocks(rid, hit, computed, 0)
    manager.allocate_new_blocks(rid, upto, upto)
    manager.cache_blocks(req, min(upto, req.num_tokens), replay_boundaries=())
    return need


def _prefill(manager, req, chunk: int, hit: list | None = None) -> None:
    """Schedule the prompt in chunks (each chunk processed before the next)."""
    start = len(hit or []) * BS
    done = start
    first = True
    while done < req.num_prompt_tokens:
        upto = min(done + chunk, req.num_prompt_tokens)
        _step(manager, req, done, upto, hit if first else None)
        first, done = False, upto


@pytest.mark.parametrize("prompt_len", [500, 512, 513, 1000])
@pytest.mark.parametrize("chunk", [64, 10_000])
def test_targets_taken_at_prompt_end_and_swapped_in(prompt_len, chunk):
    spec = _wrapped()
    manager, pool = _manager(spec, caching=True)
    start = pool.get_num_free_blocks()
    req = _request("a", _tokens(prompt_len, 1))
    assert _admit(manager, req)
    plan = spec.plan(prompt_len)
    m, tail = plan.kept_blocks, plan.tail_block
    done = 0
    while done < prompt_len:
        upto = min(done + chunk, prompt_len)
        need = _step(manager, req, done, upto)
        taken = manager.take_new_targets()
        held = len(manager.req_to_blocks["a"])
        if upto < prompt_len:
            assert taken == {}
        else:  # the chunk that ends the prompt takes the targets, counted
            assert list(taken) == ["a"] and len(taken["a"]) == m
            assert need == -(-upto // BS) - (-(-done // BS)) + m
            ids = set(taken["a"])
            assert not ids & {b.block_id for b in manager.req_to_blocks["a"]}
            assert all(pool.blocks[i].ref_cnt == 1 and pool.blocks[i].block_hash is None
                       for i in ids)
        assert held == -(-upto // BS)
        done = upto
    old = list(manager.req_to_blocks["a"])
    hashes = [b.block_hash for b in old]
    assert [h is not None for h in hashes] == [i < tail for i in range(len(old))]
    # Release: targets at [0, m), null blocks at [m, T), the old prompt blocks free, hashed.
    _step(manager, req, prompt_len, prompt_len + 1)
    blocks = manager.req_to_blocks["a"]
    assert [b.block_id for b in blocks[:m]] == taken["a"]
    assert all(b.is_null for b in blocks[m:tail])
    assert blocks[tail : len(old)] == old[tail:]
    queue = pool.free_block_queue.get_all_free_blocks()
    assert queue[-tail:] == list(reversed(old[:tail]))  # LRU end, block 0 evicted last
    for i, block in enumerate(old[:tail]):
        assert block.ref_cnt == 0 and block.block_hash == hashes[i]
        assert pool.get_cached_block(req.block_hashes[i], [0])[0] is block
    # Nothing after the prompt's full blocks is ever hashed.
    for n in (prompt_len + 1, prompt_len + 3 * BS):
        manager.allocate_new_blocks("a", n, n)
        manager.cache_blocks(req, n, replay_boundaries=())
    assert all(b.block_hash is None for b in manager.req_to_blocks["a"][tail:])
    assert all(b.block_hash is None for b in blocks[:m])
    manager.free("a")
    manager.forget_request("a")
    assert pool.get_num_free_blocks() == start


def test_a_hit_prefix_is_shared_never_written_and_survives():
    """B hits A's cached prefix: B's allocation takes targets, B's release drops only
    its references (A still holds the blocks); A's blocks keep their hashes."""
    spec = _wrapped()
    manager, pool = _manager(spec, caching=True)
    start = pool.get_num_free_blocks()
    prefix = _tokens(8 * BS, 2)
    a = _request("a", prefix + _tokens(40, 3), {"kv_compression": "none"})
    assert not _admit(manager, a, {"kv_compression": "none"})
    _prefill(manager, a, 10_000)
    b = _request("b", prefix + _tokens(300, 4))
    assert _admit(manager, b)
    hit = _hit(manager, pool, b)
    assert len(hit) == 8 and hit == manager.req_to_blocks["a"][:8]
    _prefill(manager, b, 10_000, hit)
    targets = manager.take_new_targets()["b"]
    assert not set(targets) & {x.block_id for x in manager.req_to_blocks["a"]}
    _step(manager, b, b.num_prompt_tokens, b.num_prompt_tokens + 1)
    assert [x.block_id for x in manager.req_to_blocks["b"][: len(targets)]] == targets
    assert all(x.ref_cnt == 1 and x.block_hash is not None for x in hit)  # A's only
    for name in ("a", "b"):
        manager.free(name)
        manager.forget_request(name)
    assert pool.get_num_free_blocks() == start
    assert all(pool.get_cached_block(h, [0]) for h in b.block_hashes[: b.num_prompt_tokens // BS])


@pytest.mark.parametrize("when", ["before_targets", "with_targets", "after_release"])
def test_free_at_any_point_returns_every_block(when):
    spec = _wrapped()
    manager, pool = _manager(spec, caching=True)
    start = pool.get_num_free_blocks()
    req = _request("a", _tokens(700, 5))
    _admit(manager, req)
    _step(manager, req, 0, 256 if when == "before_targets" else 700)
    if when == "after_release":
        _step(manager, req, 700, 701)
    manager.free("a")
    manager.forget_request("a")
    assert manager.take_new_targets() == {}
    assert pool.get_num_free_blocks() == start
    assert all(b.ref_cnt == 0 for b in pool.blocks if not b.is_null)


@pytest.mark.parametrize("cfg,extra_args,want", [
    (KVCompressionConfig(method="snapkv", budget=64, window=8), None, (600 - 8) // BS * BS),
    (KVCompressionConfig(method="snapkv", budget=64, window=40), None, (600 - 40) // BS * BS),
    (KVCompressionConfig(method="snapkv", budget=128, window=8), {"kv_window": 100},
     (600 - 100) // BS * BS),
    (KVCompressionConfig(method="streamingllm", budget=64, window=8), None, 599),
    (KVCompressionConfig(method="snapkv", budget=64, window=8), {"kv_compression": "none"},
     None),
    (KVCompressionConfig(method="snapkv", budget=1024, window=8), None, None),
])
def test_hit_cap_keeps_the_observation_window_computed(cfg, extra_args, want):
    spec = _wrapped(compression=cfg)
    manager, _ = _manager(spec, caching=True)
    req = _request("a", _tokens(600, 6), extra_args)
    _admit(manager, req, extra_args)
    assert manager.hit_cap(req) == want


def test_caching_off_compacts_in_place_without_targets():
    spec = _wrapped()
    manager, pool = _manager(spec, caching=False)
    req = _request("a", _tokens(700, 7))
    _admit(manager, req)
    need = _step(manager, req, 0, 700)
    assert need == -(-700 // BS) and manager.take_new_targets() == {}
    before = list(manager.req_to_blocks["a"])
    _step(manager, req, 700, 701)
    plan = spec.plan(700, overrides_of(None))
    assert manager.req_to_blocks["a"][: plan.kept_blocks] == before[: plan.kept_blocks]
