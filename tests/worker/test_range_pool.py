"""RangePool: one slot per running request, freed when the request leaves."""

from __future__ import annotations

import pytest
import torch

from vllm_adakv.worker.range_pool import RangePool


def test_slots_are_stable_reused_and_bounded():
    pool = RangePool(num_slots=2, num_layers=3, num_kv_heads=4, device="cpu")
    a, b = pool.slot("a"), pool.slot("b")
    assert {a, b} == {0, 1} and pool.slot("a") == a
    with pytest.raises(RuntimeError, match="no free page-range slot"):
        pool.slot("c")
    pool.retain(frozenset({"b"}))
    assert pool.slot("c") == a  # a's slot went back to the free list
    assert pool.slot("b") == b


def test_store_writes_only_its_slot_and_layer():
    pool = RangePool(num_slots=3, num_layers=2, num_kv_heads=4, device="cpu")
    start = torch.tensor([0, 2, 5, 5], dtype=torch.int32)
    counts = torch.tensor([20, 40, 0, 7], dtype=torch.int32)
    bases = torch.tensor([7, 99], dtype=torch.int32)
    pool.store_rows(["r"], [1], start[None, None], counts[None, None], bases[None],
                    torch.tensor([24], dtype=torch.int32))
    slot = pool.slot("r")
    assert torch.equal(pool.page_start[slot, 1], start)
    assert torch.equal(pool.kept_counts[slot, 1], counts)
    assert torch.equal(pool.chunk_base[slot], bases) and int(pool.capacity[slot]) == 24
    others = torch.ones(3, 2, dtype=torch.bool)
    others[slot, 1] = False
    assert not pool.kept_counts[others].any() and not pool.page_start[others].any()
    assert not pool.chunk_base[[s for s in range(3) if s != slot]].any()


def test_store_all_layers_of_several_requests():
    pool = RangePool(num_slots=4, num_layers=3, num_kv_heads=2, device="cpu")
    starts = torch.randint(0, 50, (2, 3, 2), dtype=torch.int32)
    counts = torch.randint(0, 50, (2, 3, 2), dtype=torch.int32)
    bases = torch.randint(0, 50, (2, 3), dtype=torch.int32)
    pool.store_rows(["a", "b"], [0, 1, 2], starts, counts, bases,
                    torch.tensor([4, 6], dtype=torch.int32))
    for i, r in enumerate("ab"):
        s = pool.slot(r)
        assert torch.equal(pool.page_start[s], starts[i])
        assert torch.equal(pool.kept_counts[s], counts[i])
        assert torch.equal(pool.chunk_base[s], bases[i])
    assert pool.capacity[[pool.slot("a"), pool.slot("b")]].tolist() == [4, 6]
