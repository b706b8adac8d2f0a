"""GVote's kept-block reports: the scheduler's book (scheduler/kept_reports.py) and
CompressedKVManager.apply_kept_blocks, against vLLM's real BlockPool, manager and Request
(the worker side: tests/worker/test_reports.py).

``Sim`` makes the calls vLLM's scheduler makes, in its order: allocate when a step is
scheduled (``num_computed_tokens`` advances then), ``remove_skipped_blocks`` on the next
allocation once the step is processed, and on preemption our hook (``on_preempt``) before
vLLM frees the blocks and resets ``num_computed_tokens``.
"""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("vllm.v1.core.block_pool")

from vllm import SamplingParams  # noqa: E402
from vllm.v1.core.block_pool import BlockPool  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402

from vllm_adakv.config import KVCompressionConfig  # noqa: E402
from vllm_adakv.protocol import (
    CompressedAttentionSpec,  # noqa: E402
    KeptBlocks,  # noqa: E402
)
from vllm_adakv.scheduler.kept_reports import KeptReports  # noqa: E402
from vllm_adakv.scheduler.manager import CompressedKVManager  # noqa: E402

BS, HEADS, LAYERS = 32, 2, 4
GVOTE = KVCompressionConfig(method="gvote", window=8, max_budget=256)
L = 1000  # cap plan: kept_blocks 8, tail_block 31 (23 released at the cap)


def _spec(cfg: KVCompressionConfig = GVOTE) -> CompressedAttentionSpec:
    base = FullAttentionSpec(block_size=BS, num_kv_heads=HEADS, head_size=32,
                             dtype=torch.float32)
    return CompressedAttentionSpec.wrap(base, cfg, LAYERS)


class Sim:
    """One KV group's manager + the scheduler's book, driven like vLLM's scheduler."""

    def __init__(self, cfg: KVCompressionConfig = GVOTE, num_ranks: int = 1,
                 num_blocks: int = 512) -> None:
        self.spec = _spec(cfg)
        self.pool = BlockPool(num_gpu_blocks=num_blocks, enable_caching=False,
                              hash_block_size=BS)
        self.manager = CompressedKVManager(self.spec, block_pool=self.pool,
                                           enable_caching=False, kv_cache_group_id=0,
                                           scheduler_block_size=BS)
        self.book = KeptReports([self.manager], num_ranks)
        self.requests: dict[str, Request] = {}
        self.start = self.pool.get_num_free_blocks()

    @property
    def free(self) -> int:
        return self.pool.get_num_free_blocks()

    def admit(self, rid: str, prompt_len: int = L) -> Request:
        req = Request(rid, list(range(prompt_len)), SamplingParams(max_tokens=64), None)
        req.status = RequestStatus.RUNNING
        self.requests[rid] = req
        return req

    def schedule_prefill(self, rid: str, upto: int | None = None) -> None:
        """Schedule the prefill up to ``upto`` tokens (the whole prompt by default)."""
        req = self.requests[rid]
        upto = req.num_prompt_tokens if upto is None else upto
        self.manager.allocate_new_blocks(rid, upto, upto)
        req.status = RequestStatus.RUNNING
        req.num_computed_tokens = upto

    def processed(self, rid: str) -> None:
        """The next allocation after the prefill's step is processed: the cap release."""
        req = self.requests[rid]
        self.manager.remove_skipped_blocks(rid, req.num_computed_tokens,
                                           num_prompt_tokens=req.num_prompt_tokens)

    def preempt(self, rid: str) -> None:
        req = self.requests[rid]
        self.book.on_preempt(req)  # patches.patch_scheduler: before vLLM's reset
        self.manager.free(rid)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0

    def finish(self, rid: str) -> None:
        req = self.requests.pop(rid)
        req.status = RequestStatus.FINISHED_LENGTH_CAPPED
        self.manager.free(rid)
        self.book.forget(rid)

    def report(self, *entries: tuple[int, str, int, int]) -> int:
        return self.book.apply([KeptBlocks(*e) for e in entries], self.requests)

    def blocks(self, rid: str) -> list[int]:
        return [b.block_id for b in self.manager.req_to_blocks[rid]]


def _plan():
    plan = _spec().plan(L)
    assert plan is not None and plan.measured and (plan.kept_blocks, plan.tail_block) == (8, 31)
    return plan


def _null(sim: Sim) -> int:
    return sim.pool.null_block.block_id


# ------------------------------------------------------------------ apply


@pytest.mark.parametrize("m", [1, 3, 7, 8])
def test_report_releases_the_blocks_the_pages_do_not_use(m):
    plan = _plan()
    sim = Sim()
    sim.admit("r")
    sim.schedule_prefill("r")
    sim.processed("r")
    before = sim.blocks("r")
    free0 = sim.free
    assert sim.report((0, "r", 0, m)) == plan.kept_blocks - m
    assert sim.free - free0 == plan.kept_blocks - m
    after = sim.blocks("r")
    assert after[:m] == before[:m] and _null(sim) not in after[:m]
    assert after[m:plan.tail_block] == [_null(sim)] * (plan.tail_block - m)
    assert after[plan.tail_block:] == before[plan.tail_block:]
    assert sim.manager.num_shrunk_blocks_total == plan.kept_blocks - m
    assert sim.manager.num_released_blocks_total == plan.released_blocks
    assert sim.manager.kept_blocks_of("r") == m
    # Decode grows the tail as before; finishing returns every block.
    sim.manager.allocate_new_blocks("r", L + 3 * BS, L + 3 * BS)
    assert sim.blocks("r")[m:plan.tail_block] == [_null(sim)] * (plan.tail_block - m)
    sim.finish("r")
    assert sim.free == sim.start


def test_report_before_the_cap_release_is_applied_with_it():
    """On the CPU the count is on the host in the compressing step itself, so the report
    comes with that step's output, before the next allocation releases the cap."""
    plan = _plan()
    sim = Sim()
    sim.admit("r")
    sim.schedule_prefill("r")
    free0 = sim.free
    assert sim.report((0, "r", 0, 2)) == 0
    assert sim.free == free0 and _null(sim) not in sim.blocks("r")  # nothing yet
    sim.processed("r")
    assert sim.free - free0 == plan.released_blocks + plan.kept_blocks - 2
    assert sim.blocks("r")[2:plan.tail_block] == [_null(sim)] * (plan.tail_block - 2)
    sim.processed("r")  # later allocations change nothing
    assert sim.free - free0 == plan.released_blocks + plan.kept_blocks - 2
    sim.finish("r")
    assert sim.free == sim.start


def test_second_report_for_one_compression_is_ignored(caplog):
    sim = Sim()
    sim.admit("r")
    sim.schedule_prefill("r")
    sim.processed("r")
    sim.report((0, "r", 0, 5))
    free0 = sim.free
    with caplog.at_level(logging.ERROR, logger="vllm.adakv"):
        assert sim.report((0, "r", 0, 1)) == 0
    assert sim.free == free0 and "a second kept-block report" in caplog.text


# ------------------------------------------------------------------ bounds


@pytest.mark.parametrize("m", [0, -1, 9, 31, 10_000])
def test_report_outside_the_plan_is_ignored(m, caplog):
    sim = Sim()
    sim.admit("r")
    sim.schedule_prefill("r")
    sim.processed("r")
    before, free0 = sim.blocks("r"), sim.free
    with caplog.at_level(logging.ERROR, logger="vllm.adakv"):
        assert sim.report((0, "r", 0, m)) == 0
    assert sim.blocks("r") == before and sim.free == free0
    assert "outside [1, 8]" in caplog.text
    assert sim.manager.kept_blocks_of("r") is None


def test_report_for_a_plan_that_is_not_measured_is_ignored(caplog):
    sim = Sim(cfg=KVCompressionConfig(method="snapkv", budget=64, window=8))
    sim.admit("r")
    sim.schedule_prefill("r")
    sim.processed("r")
    before, free0 = sim.blocks("r"), sim.free
    with caplog.at_level(logging.ERROR, logger="vllm.adakv"):
        assert sim.report((0, "r", 0, 1)) == 0
    assert sim.blocks("r") == before and sim.free == free0 and "not measured" in caplog.text


def test_report_for_an_incompressible_prompt_is_ignored(caplog):
    sim = Sim()
    sim.admit("r", prompt_len=200)  # below the cap: not compressed
    sim.schedule_prefill("r")
    sim.processed("r")
    before = sim.blocks("r")
    with caplog.at_level(logging.ERROR, logger="vllm.adakv"):
        assert sim.report((0, "r", 0, 1)) == 0
    assert sim.blocks("r") == before


def test_report_for_a_finished_or_unknown_request_is_ignored():
    sim = Sim()
    sim.admit("r")
    sim.schedule_prefill("r")
    sim.processed("r")
    sim.finish("r")
    assert sim.free == sim.start
    assert sim.report((0, "r", 0, 1), (0, "nobody", 0, 1)) == 0
    assert sim.free == sim.start


def test_report_before_the_compression_is_scheduled_is_ignored(caplog):
    sim = Sim()
    sim.admit("r")
    sim.schedule_prefill("r", upto=512)  # chunked prefill, prompt not reached
    before = sim.blocks("r")
    with caplog.at_level(logging.ERROR, logger="vllm.adakv"):
        assert sim.report((0, "r", 0, 1)) == 0
        assert sim.report((0, "r", 1, 1)) == 0
    assert sim.blocks("r") == before and caplog.text.count("ignored") == 2
    sim.schedule_prefill("r")
    sim.processed("r")
    assert sim.report((0, "r", 0, 1)) == _plan().kept_blocks - 1  # the real one still works


# ------------------------------------------------------------------ preemption


def test_stale_report_never_shrinks_the_restarted_request():
    """Compressed, preempted before its report arrived, restarted and compressed again:
    the first compression's report (m = 1) comes after the second compression's cap
    release, the second's (m = 6) after it. Only the second may shrink the request."""
    plan = _plan()
    sim = Sim()
    sim.admit("r")
    sim.schedule_prefill("r")
    sim.preempt("r")  # before the step was processed: no release at all yet
    assert sim.free == sim.start
    sim.schedule_prefill("r")  # restarted, compressed again
    sim.processed("r")
    free0 = sim.free
    assert free0 == sim.start - plan.tail_block - 1 + plan.released_blocks
    assert sim.report((0, "r", 0, 1)) == 0  # stale: answers the first compression
    assert sim.free == free0 and _null(sim) not in sim.blocks("r")[:plan.kept_blocks]
    assert sim.book.num_stale == 1
    assert sim.report((0, "r", 1, 6)) == plan.kept_blocks - 6
    assert sim.manager.kept_blocks_of("r") == 6
    sim.finish("r")
    assert sim.free == sim.start


def test_stale_report_before_the_restart_compresses_is_ignored():
    """The stale report arriving while the restart is still prefilling (or before the
    restart's cap release) must not be parked for it either."""
    plan = _plan()
    sim = Sim()
    sim.admit("r")
    sim.schedule_prefill("r")
    sim.processed("r")
    sim.preempt("r")
    sim.schedule_prefill("r", upto=512)
    assert sim.report((0, "r", 0, 1)) == 0  # mid-prefill
    sim.schedule_prefill("r")
    assert sim.report((0, "r", 0, 1)) == 0  # compressed, cap not released yet
    sim.processed("r")
    free0 = sim.free
    assert _null(sim) not in sim.blocks("r")[:plan.kept_blocks]
    assert sim.report((0, "r", 1, 3)) == plan.kept_blocks - 3
    assert sim.free - free0 == plan.kept_blocks - 3
    assert sim.book.num_stale == 2


def test_preemption_before_the_prompt_completes_is_not_a_compression():
    """Preempted mid-prefill: that prefill never compressed, so the restart's compression
    is still the request's first (seq 0)."""
    plan = _plan()
    sim = Sim()
    sim.admit("r")
    sim.schedule_prefill("r", upto=600)
    sim.preempt("r")
    sim.schedule_prefill("r")
    sim.processed("r")
    assert sim.report((0, "r", 0, 4)) == plan.kept_blocks - 4
    assert sim.book.num_stale == 0


def test_preemption_after_the_shrink_releases_again_after_restart():
    plan = _plan()
    sim = Sim()
    sim.admit("r")
    for epoch in range(3):
        sim.schedule_prefill("r")
        sim.processed("r")
        assert sim.report((0, "r", epoch, 2)) == plan.kept_blocks - 2, epoch
        sim.preempt("r")
        assert sim.free == sim.start, epoch
    assert sim.manager.num_shrunk_blocks_total == 3 * (plan.kept_blocks - 2)


def test_report_from_a_compression_not_counted_is_an_error(caplog):
    sim = Sim()
    sim.admit("r")
    sim.schedule_prefill("r")
    sim.processed("r")
    with caplog.at_level(logging.ERROR, logger="vllm.adakv"):
        assert sim.report((0, "r", 1, 1)) == 0
    assert "ignored" in caplog.text
    assert sim.manager.kept_blocks_of("r") is None


# ------------------------------------------------------------------ tensor parallel


def test_tp_applies_the_max_over_ranks_once_all_reported():
    plan = _plan()
    sim = Sim(num_ranks=2)
    sim.admit("r")
    sim.schedule_prefill("r")
    sim.processed("r")
    free0 = sim.free
    assert sim.report((0, "r", 0, 2)) == 0
    assert sim.free == free0  # rank 1 may still use every kept block
    assert sim.report((1, "r", 0, 5)) == plan.kept_blocks - 5
    assert sim.manager.kept_blocks_of("r") == 5
    assert sim.blocks("r")[5:plan.tail_block] == [sim.pool.null_block.block_id] * (
        plan.tail_block - 5)


def test_tp_ranks_reporting_in_one_step_and_in_any_order():
    plan = _plan()
    sim = Sim(num_ranks=4)
    for rid in ("a", "b"):
        sim.admit(rid)
        sim.schedule_prefill(rid)
        sim.processed(rid)
    released = sim.report((3, "a", 0, 1), (1, "b", 0, 4), (0, "a", 0, 6), (2, "a", 0, 2),
                          (0, "b", 0, 1), (1, "a", 0, 3), (2, "b", 0, 4))
    assert released == plan.kept_blocks - 6
    assert sim.manager.kept_blocks_of("a") == 6 and sim.manager.kept_blocks_of("b") is None
    assert sim.report((3, "b", 0, 7)) == plan.kept_blocks - 7


def test_tp_reports_of_ranks_before_a_preemption_do_not_mix_with_later_ones():
    plan = _plan()
    sim = Sim(num_ranks=2)
    sim.admit("r")
    sim.schedule_prefill("r")
    sim.processed("r")
    sim.report((0, "r", 0, 1))  # rank 0 of the first compression
    sim.preempt("r")
    sim.schedule_prefill("r")
    sim.processed("r")
    assert sim.report((1, "r", 0, 1)) == 0  # rank 1, first compression: stale
    assert sim.report((1, "r", 1, 7)) == 0  # second compression: rank 0 still missing
    assert sim.report((0, "r", 1, 2)) == plan.kept_blocks - 7


def test_tp_rank_out_of_range_and_duplicates_are_ignored(caplog):
    sim = Sim(num_ranks=2)
    sim.admit("r")
    sim.schedule_prefill("r")
    sim.processed("r")
    free0 = sim.free
    with caplog.at_level(logging.ERROR, logger="vllm.adakv"):
        assert sim.report((2, "r", 0, 1), (0, "r", 0, 1), (0, "r", 0, 1)) == 0
    assert sim.free == free0
    assert "rank 2" in caplog.text and "twice" in caplog.text


# ------------------------------------------------------------------ --kv-reserve-output


def test_reserve_output_is_counted_as_before_the_shrink():
    cfg = KVCompressionConfig(method="gvote", window=8, max_budget=256, reserve_output=200)
    plan = _plan()
    sim = Sim(cfg=cfg, num_blocks=64)
    sim.admit("r")
    sim.schedule_prefill("r")
    sim.processed("r")
    # the reserve: blocks up to L + 200 tokens that r does not hold yet
    reserve = -(-(L + 200) // BS) - len(sim.blocks("r"))
    assert reserve > 0 and sim.manager.reserved_blocks() == reserve
    vanilla = -(-300 // BS)
    assert sim.manager.get_num_blocks_to_allocate("new", 300, (), 0, 0, 300) == vanilla + reserve
    free0 = sim.free
    sim.report((0, "r", 0, 2))
    assert sim.free - free0 == plan.kept_blocks - 2
    assert sim.manager.reserved_blocks() == reserve  # the tail still needs them
    assert sim.manager.get_num_blocks_to_allocate("new", 300, (), 0, 0, 300) == vanilla + reserve
    # r grows into its reserve: it needs exactly the reserved blocks, no more.
    sim.manager.allocate_new_blocks("r", L + 200, L + 200)
    assert sim.manager.reserved_blocks() == 0
    assert sim.free == free0 + plan.kept_blocks - 2 - reserve
    sim.preempt("r")
    assert sim.manager.reserved_blocks() == 0 and sim.free == sim.start
