"""Worker side: kept-block reports of measured plans (GVote), on their way to the scheduler.

A GVote request is planned at its cap (``CompressionPlan.measured``); after compaction
its pages use only ``m <= plan.kept_blocks`` blocks, a number this worker learns on the
device and reads back about a step later. The compression code then calls
:func:`post_kept_blocks`. Once per step, ``patches.patch_kept_block_reports`` takes what
was posted out of this module (:func:`attach`) and hangs it on the step's
``ModelRunnerOutput`` (attribute :data:`ATTR`); the executor brings every rank's entries
to the scheduler, which releases blocks ``[max over ranks of m, plan.kept_blocks)``
(``core/kept_reports.py``).

Each post gets a sequence number per request: the n-th post of a request answers its
n-th compression (a request is compressed again when a preemption restarts its prefill).
The scheduler counts compressions the same way and drops an answer to an earlier one, so
a report that comes late can never shrink a restarted request. This needs the compression
code to post exactly once per compression of a measured plan, in compression order (a
post it leaves out only costs that request its shrink).

Process-local and lock-free: posts and takes both run on the model runner's thread.
"""

from __future__ import annotations

import logging
from collections.abc import Container
from copy import copy
from typing import Any, NamedTuple

logger = logging.getLogger("vllm.adakv")

# The ModelRunnerOutput attribute that carries a step's entries (a tuple of KeptBlocks).
ATTR = "adakv_kept_blocks"
# Posts waiting for the next step's output. Bounded: past it a post is dropped (counted
# in its request's sequence all the same), which only forgoes that request's shrink.
MAX_POSTED = 1 << 16


class KeptBlocks(NamedTuple):
    """One rank's answer for one compression of one request."""

    rank: int  # tensor-parallel rank of the worker
    req_id: str
    seq: int  # 0 for the request's first compression, 1 after a restart, ...
    kept_blocks: int  # blocks [0, kept_blocks) hold the request's pages on this rank


_POSTED: list[tuple[str, int, int]] = []  # (req_id, seq, kept_blocks)
_SEQ: dict[str, int] = {}  # posts so far per request (live requests only)
_dropped = 0


def post_kept_blocks(req_id: str, kept_blocks: int) -> None:
    """Report that ``req_id``'s pages, after its latest compression, use blocks
    ``[0, kept_blocks)`` on this worker. Called once per compression of a measured plan."""
    global _dropped
    seq = _SEQ.get(req_id, 0)
    _SEQ[req_id] = seq + 1
    if len(_POSTED) >= MAX_POSTED:
        if _dropped == 0:
            logger.error("vllm-adakv: over %d kept-block reports waiting for a step; "
                         "dropping (those requests keep their planned blocks)", MAX_POSTED)
        _dropped += 1
        return
    _POSTED.append((req_id, seq, int(kept_blocks)))


def pending() -> bool:
    """Whether posts wait for the next step's output."""
    return bool(_POSTED)


def take_kept_blocks(live: Container[str], rank: int) -> tuple[KeptBlocks, ...]:
    """Everything posted since the last take, for requests in ``live`` (the runner's
    request table: a finished request's report is dropped); forgets the sequence of
    requests no longer live."""
    if not _POSTED:
        return ()
    entries = tuple(KeptBlocks(rank, r, s, m) for r, s, m in _POSTED if r in live)
    _POSTED.clear()
    for req_id in [r for r in _SEQ if r not in live]:
        del _SEQ[req_id]
    return entries


def add_entries(output: Any, entries: tuple[KeptBlocks, ...]) -> None:
    setattr(output, ATTR, getattr(output, ATTR, ()) + entries)


def attach(output: Any, live: Container[str], rank: int) -> Any:
    """``output`` of ``sample_tokens`` carrying what was posted since the last step.

    A ``ModelRunnerOutput`` gets the entries at once (vLLM's shared empty output is
    copied first); an ``AsyncModelRunnerOutput`` gets them when its ``get_output`` runs.
    Anything else (pipeline intermediates) leaves the posts for the next step."""
    if not _POSTED:
        return output
    from vllm.v1.outputs import (
        EMPTY_MODEL_RUNNER_OUTPUT,
        AsyncModelRunnerOutput,
        ModelRunnerOutput,
    )

    if not isinstance(output, (ModelRunnerOutput, AsyncModelRunnerOutput)):
        return output
    entries = take_kept_blocks(live, rank)
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


def minimal_output(output: Any, live: Container[str], rank: int) -> Any:
    """What a rank other than 0 returns when only ``KeptBlocksAggregator`` reads its
    output (tensor parallel, no KV connector): no tokens, just its reports. vLLM's
    executor drops these ranks' outputs otherwise; an async output is never resolved
    here, as vLLM never resolves it on these ranks."""
    from vllm.v1.outputs import AsyncModelRunnerOutput, ModelRunnerOutput

    if not isinstance(output, (ModelRunnerOutput, AsyncModelRunnerOutput)):
        return output
    minimal = ModelRunnerOutput(req_ids=[], req_id_to_index={})
    entries = take_kept_blocks(live, rank)
    if entries:
        add_entries(minimal, entries)
    return minimal


def entries_of(output: Any) -> tuple[KeptBlocks, ...]:
    """The entries ``output`` carries (removed from it)."""
    entries = getattr(output, ATTR, ())
    if entries:
        delattr(output, ATTR)
    return entries


class KeptBlocksAggregator:
    """Executor side, tensor parallel: every rank's entries onto the output vLLM keeps.

    vLLM's multiprocess executor returns one rank's output unless the executor has a
    ``kv_output_aggregator``, in which case it waits for every rank's output and calls
    ``aggregate(outputs, output_rank)`` (``MultiprocExecutor.collective_rpc``). This one
    gathers the entries of all ranks and hands the rest to vLLM's own aggregator when a
    KV connector installed one (``inner``)."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner

    def aggregate(self, outputs: list[Any], output_rank: int = 0) -> Any:
        entries: tuple[KeptBlocks, ...] = ()
        for out in outputs:
            if out is not None:
                entries += entries_of(out)
        result = (self.inner.aggregate(outputs, output_rank) if self.inner is not None
                  else outputs[output_rank])
        if entries and result is not None:
            add_entries(result, entries)
        return result


def reset() -> None:
    """Forget every post (tests)."""
    global _dropped
    _POSTED.clear()
    _SEQ.clear()
    _dropped = 0
