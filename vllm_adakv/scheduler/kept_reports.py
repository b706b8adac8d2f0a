"""Scheduler side: apply the workers' kept-block reports (GVote) to the KV manager.

A measured plan (GVote, ``CompressionPlan.measured``) is released at its cap first
(``CompressedKVManager.remove_skipped_blocks``); each worker then reports the blocks
``m`` its pages really use (``worker/reports.py``), and the manager releases
``[m, plan.kept_blocks)`` (``CompressedKVManager.apply_kept_blocks``).

Which compression a report answers. A request is compressed once per prefill: in the
step whose scheduled chunk reaches its last prompt token, again after a preemption
restarts its prefill. Worker ``r`` numbers its posts per request (``seq``), so its n-th
report answers the n-th compression. Here, a request's compressions before its current
prefill are counted when it is preempted: the prefill that a preemption cuts short had
compressed iff the request's ``num_computed_tokens`` (advanced when a step is
*scheduled*, so a compression in flight counts) had reached its prompt length. A report
with ``seq`` below that count answers an earlier prefill and is dropped, whenever it
arrives: a stale report can never shrink a restarted request, even one compressed again
since (time alone cannot tell them apart: the old count may reach the host after the
restart). ``seq`` above it, or a report while the current prefill has not been
scheduled past the prompt, cannot happen and is logged as an error and ignored.

Tensor parallelism. Each rank holds different KV heads and reports its own ``m``. A rank
that has not reported may still use every block up to ``plan.kept_blocks``, so nothing
can be released before the last rank's report; then ``[max_r m_r, plan.kept_blocks)``
is released, the blocks no rank uses. (Releasing "as reports come" would free exactly
the same blocks at the same moment.) A rank whose report never arrives only leaves the
request at its cap.

Bounds: ``1 <= m <= plan.kept_blocks`` (the plan's layout needs at least one block and
never more than it reserved); anything else is logged and ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from vllm_adakv.protocol import KeptBlocks

logger = logging.getLogger("vllm.adakv")


class KeptReports:
    """One scheduler's book of kept-block reports (per engine, not per process)."""

    def __init__(self, managers: list[Any], num_ranks: int) -> None:
        self.managers = managers  # the CompressedKVManagers of the scheduler's KV groups
        self.num_ranks = num_ranks
        # request id -> compressions of its earlier prefills (cut by preemptions)
        self._earlier: dict[str, int] = {}
        # request id -> (seq, {rank: m}) of its current compression, until every rank is in
        self._ranks: dict[str, tuple[int, dict[int, int]]] = {}
        self.num_applied = 0  # compressions whose reports were applied (all ranks in)
        self.num_stale = 0  # reports dropped as answers to an earlier prefill

    def on_preempt(self, request: Any) -> None:
        """Before vLLM resets ``request`` for recompute (``Scheduler._preempt_request``)."""
        request_id = request.request_id
        self._ranks.pop(request_id, None)
        if request.num_computed_tokens >= request.num_prompt_tokens:
            self._earlier[request_id] = self._earlier.get(request_id, 0) + 1

    def forget(self, request_id: str) -> None:
        """The request's blocks are freed for good (finished or aborted)."""
        self._earlier.pop(request_id, None)
        self._ranks.pop(request_id, None)

    def apply(self, entries: Iterable[KeptBlocks], requests: Mapping[str, Any]) -> int:
        """Apply one step's reports (``requests``: the scheduler's request table);
        returns the blocks released."""
        return sum(self._apply_one(e, requests) for e in entries)

    def _apply_one(self, entry: KeptBlocks, requests: Mapping[str, Any]) -> int:
        rank, request_id, seq, kept_blocks = entry
        if not 0 <= rank < self.num_ranks:
            logger.error("vllm-adakv: kept-block report from rank %d, but %d rank(s) "
                         "report; ignored", rank, self.num_ranks)
            return 0
        request = requests.get(request_id)
        if request is None or request.is_finished():
            return 0  # finished (or aborted) since: its blocks are gone anyway
        current = self._earlier.get(request_id, 0)
        if seq < current:
            self.num_stale += 1
            return 0  # answers a prefill that a preemption cut short
        if seq > current or request.num_computed_tokens < request.num_prompt_tokens:
            logger.error(
                "vllm-adakv: rank %d reported compression #%d of request %s, which the "
                "scheduler has not scheduled (its current prefill is compression #%d, "
                "%d of %d prompt tokens scheduled); ignored", rank, seq, request_id, current,
                request.num_computed_tokens, request.num_prompt_tokens)
            return 0
        pending = self._ranks.get(request_id)
        if pending is None or pending[0] != seq:
            pending = (seq, {})
            self._ranks[request_id] = pending
        ranks = pending[1]
        if rank in ranks:
            logger.error("vllm-adakv: rank %d reported request %s's compression #%d twice; "
                         "ignored", rank, request_id, seq)
            return 0
        ranks[rank] = kept_blocks
        if len(ranks) < self.num_ranks:
            return 0
        del self._ranks[request_id]
        self.num_applied += 1
        needed = max(ranks.values())
        released = 0
        for manager in self.managers:
            try:
                released += manager.apply_kept_blocks(
                    request_id, request.num_prompt_tokens, needed)
            except ValueError as exc:
                logger.error("vllm-adakv: %s; ignored", exc)
        return released


_ATTR = "_vllm_adakv_kept_reports"


def book_of(scheduler: Any) -> KeptReports | None:
    """The scheduler's book, made on first use; None when it compresses nothing."""
    book = scheduler.__dict__.get(_ATTR, False)
    if book is False:
        book = _make_book(scheduler)
        setattr(scheduler, _ATTR, book)
    return book


def _make_book(scheduler: Any) -> KeptReports | None:
    from vllm_adakv.config import KVCompressionConfig
    from vllm_adakv.scheduler.manager import compressed_managers

    vllm_config = scheduler.vllm_config
    if not KVCompressionConfig.from_additional_config(vllm_config.additional_config).enabled:
        return None
    managers = compressed_managers(scheduler.kv_cache_manager)
    if not managers:
        return None
    return KeptReports(managers, vllm_config.parallel_config.tensor_parallel_size)
