"""Worker side: kept-block reports of measured plans (GVote), on their way to the scheduler.

A GVote request is planned at its cap (``CompressionPlan.measured``); after compaction
its pages use only ``m <= plan.kept_blocks`` blocks, a number this worker learns on the
device and reads back about a step later. The compression code then calls
``KeptBlockPosts.post`` of its context's queue. Once per step,
``patches.patch_kept_block_reports`` takes what was posted (:func:`attach`) and hangs it
on the step's ``ModelRunnerOutput`` (``protocol.ATTR``); the executor brings every rank's entries
to the scheduler, which releases blocks ``[max over ranks of m, plan.kept_blocks)``
(``scheduler/kept_reports.py``).

Each post gets a sequence number per request: the n-th post of a request answers its
n-th compression (a request is compressed again when a preemption restarts its prefill).
The scheduler counts compressions the same way and drops an answer to an earlier one, so
a report that comes late can never shrink a restarted request. This needs the compression
code to post exactly once per compression of a measured plan, in compression order (a
post it leaves out only costs that request its shrink).

Lock-free: posts and takes both run on the model runner's thread.
"""

from __future__ import annotations

import logging
from collections.abc import Container
from copy import copy
from typing import Any

from vllm_adakv.protocol import KeptBlocks, add_entries

logger = logging.getLogger("vllm.adakv")

# Posts waiting for the next step's output. Bounded: past it a post is dropped (counted
# in its request's sequence all the same), which only forgoes that request's shrink.
MAX_POSTED = 1 << 16


class KeptBlockPosts:
    """Kept-block reports of one worker waiting for the next step's output."""

    def __init__(self) -> None:
        self._posted: list[tuple[str, int, int]] = []  # (req_id, seq, kept_blocks)
        self._seq: dict[str, int] = {}  # posts so far per request (live requests only)
        self._dropped = 0

    def post(self, req_id: str, kept_blocks: int) -> None:
        """Report that ``req_id``'s pages, after its latest compression, use blocks
        ``[0, kept_blocks)`` on this worker. Called once per compression of a measured
        plan."""
        seq = self._seq.get(req_id, 0)
        self._seq[req_id] = seq + 1
        if len(self._posted) >= MAX_POSTED:
            if self._dropped == 0:
                logger.error("vllm-adakv: over %d kept-block reports waiting for a step; "
                             "dropping (those requests keep their planned blocks)", MAX_POSTED)
            self._dropped += 1
            return
        self._posted.append((req_id, seq, int(kept_blocks)))

    def pending(self) -> bool:
        """Whether posts wait for the next step's output."""
        return bool(self._posted)

    def take(self, live: Container[str], rank: int) -> tuple[KeptBlocks, ...]:
        """Everything posted since the last take, for requests in ``live`` (the runner's
        request table: a finished request's report is dropped); forgets the sequence of
        requests no longer live."""
        if not self._posted:
            return ()
        entries = tuple(KeptBlocks(rank, r, s, m) for r, s, m in self._posted if r in live)
        self._posted.clear()
        for req_id in [r for r in self._seq if r not in live]:
            del self._seq[req_id]
        return entries


def attach(output: Any, posts: KeptBlockPosts, live: Container[str], rank: int) -> Any:
    """``output`` of ``sample_tokens`` carrying what was posted since the last step.

    A ``ModelRunnerOutput`` gets the entries at once (vLLM's shared empty output is
    copied first); an ``AsyncModelRunnerOutput`` gets them when its ``get_output`` runs.
    Anything else (pipeline intermediates) leaves the posts for the next step."""
    if not posts.pending():
        return output
    from vllm.v1.outputs import (
        EMPTY_MODEL_RUNNER_OUTPUT,
        AsyncModelRunnerOutput,
        ModelRunnerOutput,
    )

    if not isinstance(output, (ModelRunnerOutput, AsyncModelRunnerOutput)):
        return output
    entries = posts.take(live, rank)
    if not entries:
        return output
    if isinstance(output, ModelRunnerOutput):
        if output is EMPTY_MODEL_RUNNER_OUTPUT:
            output = copy(output)
        add_entries(output, entries)
        return output
    get_output = output.get_output

    def get_output_with_reports() -> Any:
        result = get_output()
        if result is EMPTY_MODEL_RUNNER_OUTPUT:
            result = copy(result)
        add_entries(result, entries)
        return result

    output.get_output = get_output_with_reports
    return output


def minimal_output(output: Any, posts: KeptBlockPosts, live: Container[str], rank: int
                   ) -> Any:
    """What a rank other than 0 returns when only ``KeptBlocksAggregator`` reads its
    output (tensor parallel, no KV connector): no tokens, just its reports. vLLM's
    executor drops these ranks' outputs otherwise; an async output is never resolved
    here, as vLLM never resolves it on these ranks."""
    from vllm.v1.outputs import AsyncModelRunnerOutput, ModelRunnerOutput

    if not isinstance(output, (ModelRunnerOutput, AsyncModelRunnerOutput)):
        return output
    minimal = ModelRunnerOutput(req_ids=[], req_id_to_index={})
    entries = posts.take(live, rank)
    if entries:
        add_entries(minimal, entries)
    return minimal
