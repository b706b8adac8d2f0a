"""Worker side: per-request compression state and the per-layer work on it.

Everything here is backend-neutral: it sees a layer's caches as logical
``[num_blocks, H, block_size, D]`` key and value views.
"""

from __future__ import annotations

import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from vllm_adakv import kernels, metrics
from vllm_adakv.attention.batch import RowPlan, StepPlan
from vllm_adakv.config import KVCompressionConfig
from vllm_adakv.memory import CompressionPlan, PageUsage, page_usage
from vllm_adakv.policies import SCORED_METHODS, gvote_keep_mask, select_keep_masks

# Page usage of the most recent compressed requests kept for inspection (bounded).
MAX_USAGE_RECORDS = 4096

# Debug hook: if set to a folder, every compressed (request, layer) keep mask [H, L] is
# saved there as ``<request id>.L<layer index>.pt`` (torch.save of a CPU bool tensor).
# Read once per store; unset costs one attribute test per compressed layer.
RECORD_KEPT_ENV = "VLLM_ADAKV_RECORD_KEPT"


def record_kept(folder: str, req_id: str, layer_idx: int, mask: torch.Tensor) -> None:
    """Save one layer's keep mask of one request (see ``RECORD_KEPT_ENV``)."""
    name = re.sub(r"[^\w.-]", "_", req_id)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.L{layer_idx:03d}.pt")
    torch.save(mask.detach().to("cpu", torch.bool), path)


@dataclass
class LayerPages:
    page_table: torch.Tensor  # [H, P] int32 page ids (block * H + slot), or [H] first pages
    counts: torch.Tensor  # [H] int32 kept tokens per head


@dataclass
class RequestKV:
    """What one request's compression left on this worker."""

    prompt_len: int
    window_queries: dict[str, torch.Tensor] = field(default_factory=dict)
    pages: dict[str, LayerPages] = field(default_factory=dict)
    # Compression time summed over layers, reported to the metrics with the kept tokens
    # once all layers are done (or, where a worker holds only some layers, next step).
    compress_seconds: float = 0.0
    unreported: bool = False
    method: str = ""  # the request's effective method



@dataclass
class _KeptCounts:
    """Kept tokens per (layer, head) of one compressed request, on their way to the host.

    The copy is queued behind the compaction (a non-blocking copy and an event on CUDA),
    so reporting never makes the host wait for the GPU in the middle of a forward."""

    req_id: str
    method: str
    prompt_len: int
    seconds: float
    plan: CompressionPlan | None  # set when every layer of the request is in ``counts``
    counts: torch.Tensor  # [layers, H] on the host once ``event`` has completed
    event: torch.cuda.Event | None

    @classmethod
    def start(cls, req_id: str, state: RequestKV, plan: CompressionPlan | None
              ) -> _KeptCounts:
        counts = torch.stack([p.counts for p in state.pages.values()])
        event = None
        if counts.is_cuda:
            host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            host.copy_(counts, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            counts = host
        return cls(req_id, state.method, state.prompt_len, state.compress_seconds, plan,
                   counts, event)

    def ready(self) -> bool:
        return self.event is None or self.event.query()


def selection_key(cfg: KVCompressionConfig) -> tuple:
    """The settings that must agree for requests to share one selection launch (all but
    the budget, which each row carries in its plan)."""
    return (cfg.method, cfg.window, cfg.gqa_reduce, cfg.pooling, cfg.pool_kernel, cfg.alpha,
            cfg.sink_tokens, cfg.gvote_samples, cfg.gvote_p, cfg.gvote_seed)


def group_by_selection(rows: list[RowPlan], default: KVCompressionConfig
                       ) -> list[list[RowPlan]]:
    """``rows`` grouped by ``selection_key`` of their effective settings, in first-seen order."""
    groups: dict[tuple, list[RowPlan]] = {}
    for row in rows:
        groups.setdefault(selection_key(row.cfg or default), []).append(row)
    return list(groups.values())


def _compact_each(key_cache, value_cache, block_table, block_rows, masks, kept_blocks
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``kernels.compact`` (explicit page tables) for each row in turn."""
    return [kernels.compact(key_cache, value_cache, block_table[b], masks[i], kept_blocks[i])
            for i, b in enumerate(block_rows)]


class CompressionStore:
    """All compressible requests of this worker, by request id."""

    def __init__(self, cfg: KVCompressionConfig) -> None:
        self.cfg = cfg
        self.requests: dict[str, RequestKV] = {}
        self.num_compressed_layers = 0
        # req_id -> reserved vs filled head-pages, once all its layers are compacted
        self._page_usage: OrderedDict[str, PageUsage] = OrderedDict()
        self._pending: list[_KeptCounts] = []
        self.record_dir = os.environ.get(RECORD_KEPT_ENV) or None

    @property
    def page_usage(self) -> OrderedDict[str, PageUsage]:
        """Reserved vs filled head-pages of the most recent compressed requests."""
        self._drain(wait=True)
        return self._page_usage

    def _report(self, req_id: str, state: RequestKV, plan: CompressionPlan | None) -> None:
        """Queue the request's kept counts for the metrics (and page usage, given ``plan``).

        Host tensors are recorded at once; device counts when their copy has landed, at
        a later step's ``begin_step`` (so on a GPU the metrics trail by about a step)."""
        if state.unreported and state.pages:
            self._pending.append(_KeptCounts.start(req_id, state, plan))
            self._drain(wait=False)
        state.unreported = False

    def _drain(self, wait: bool) -> None:
        """Report the queued counts that reached the host (all of them if ``wait``)."""
        keep = []
        for item in self._pending:
            if not (wait or item.ready()):
                keep.append(item)
                continue
            if item.event is not None:
                item.event.synchronize()
            metrics.record_compression(item.method, item.prompt_len,
                                       float(item.counts.float().mean()), item.seconds)
            if item.plan is not None:
                self._page_usage[item.req_id] = page_usage(item.plan, item.counts.tolist())
                self._page_usage.move_to_end(item.req_id)
                while len(self._page_usage) > MAX_USAGE_RECORDS:
                    self._page_usage.popitem(last=False)
        self._pending = keep

    def begin_step(self, step: StepPlan) -> None:
        """Drop finished requests; restart requests whose prefill starts over (preemption).

        Requests compressed in the previous step and not yet reported (a worker
        holding only some of the layers) are reported to the metrics here, and counts
        queued earlier that have reached the host are recorded.
        """
        for req_id, state in self.requests.items():
            self._report(req_id, state, plan=None)
        self._drain(wait=False)
        for req_id in [r for r in self.requests if r not in step.live_req_ids]:
            del self.requests[req_id]
        for row in step.rows:
            state = self.requests.get(row.req_id)
            if state is None or row.context_start == 0 or state.prompt_len != row.prompt_len:
                self.requests[row.req_id] = RequestKV(prompt_len=row.prompt_len)

    def stash_window_queries(self, row: RowPlan, layer: str, query: torch.Tensor,
                             token_offset: int) -> None:
        """Keep this chunk's queries of the observation window [L - w, L)."""
        w = (row.cfg or self.cfg).window
        lo = max(row.context_start, row.prompt_len - w)
        hi = min(row.seq_len, row.prompt_len)
        if lo >= hi:
            return
        state = self.requests[row.req_id]
        buf = state.window_queries.get(layer)
        if buf is None:
            buf = query.new_empty((w, query.shape[1], query.shape[2]))
            state.window_queries[layer] = buf
        start = token_offset + (lo - row.context_start)
        buf[lo - (row.prompt_len - w) : hi - (row.prompt_len - w)] = query[start : start + hi - lo]

    def _gvote_mask(self, row: RowPlan, layer: str, layer_idx: int, key_cache: torch.Tensor,
                    block_ids: torch.Tensor, scale: float) -> torch.Tensor:
        cfg = row.cfg or self.cfg
        keys = kernels.gather_prompt_keys(key_cache, block_ids, row.prompt_len)
        return gvote_keep_mask(
            self.requests[row.req_id].window_queries[layer], keys, scale=scale,
            num_samples=cfg.gvote_samples, nucleus_p=cfg.gvote_p, seed=cfg.gvote_seed,
            layer_idx=layer_idx, max_keep=row.plan.layer_budgets[layer_idx],
            pool_kernel=cfg.pool_kernel,
        )

    def keep_masks(self, rows: list[RowPlan], layer: str, layer_idx: int,
                   key_cache: torch.Tensor, block_table: torch.Tensor, scale: float
                   ) -> torch.Tensor:
        """Keep masks ``[R, H, Lmax]`` of one layer for rows that share their settings but
        the budget (``selection_key``): one scoring launch pair and one batched selection."""
        cfg = rows[0].cfg or self.cfg
        heads = key_cache.shape[1]
        lengths = [r.prompt_len for r in rows]
        if cfg.method == "gvote":
            masks = torch.zeros(len(rows), heads, max(lengths), dtype=torch.bool,
                                device=key_cache.device)
            for i, row in enumerate(rows):
                masks[i, :, : row.prompt_len] = self._gvote_mask(
                    row, layer, layer_idx, key_cache, block_table[row.row], scale)
            return masks
        scores = None
        if cfg.method in SCORED_METHODS:
            queries = torch.stack([self.requests[r.req_id].window_queries[layer] for r in rows])
            scores = kernels.score_windows(
                queries, key_cache, block_table, [r.row for r in rows], lengths, scale,
                gqa_reduce=cfg.gqa_reduce, pooling=cfg.pooling, pool_kernel=cfg.pool_kernel,
            )
        return select_keep_masks(
            cfg.method, scores, num_heads=heads, prompt_lens=lengths, window=cfg.window,
            layer_budgets=[r.plan.layer_budgets[layer_idx] for r in rows], alpha=cfg.alpha,
            sink_tokens=cfg.sink_tokens, device=key_cache.device,
        )

    def compress_rows(self, rows: list[RowPlan], layer: str, layer_idx: int,
                      key_cache: torch.Tensor, value_cache: torch.Tensor,
                      block_table: torch.Tensor, scale: float, compact_rows=None
                      ) -> list[tuple[RowPlan, LayerPages]]:
        """Score, select and compact one layer of every request whose prompt completes in
        this step; requests with the same settings (but the budget) share each launch.

        ``compact_rows(key_cache, value_cache, block_table, block_rows, masks, kept_blocks)``
        returns one ``(page_table, counts)`` per row; default ``kernels.compact`` per row
        (explicit page tables). The CUDA backend passes ``kernels.compact_rows_ranges``
        (``page_table`` is then each head's first page index, ``[H]``).
        """
        done: list[tuple[RowPlan, LayerPages]] = []
        for group in group_by_selection(rows, self.cfg):
            start = time.perf_counter()
            masks = self.keep_masks(group, layer, layer_idx, key_cache, block_table, scale)
            if self.record_dir is not None:
                for i, row in enumerate(group):
                    record_kept(self.record_dir, row.req_id, layer_idx,
                                masks[i, :, : row.prompt_len])
            results = (compact_rows or _compact_each)(
                key_cache, value_cache, block_table, [r.row for r in group], masks,
                [r.plan.kept_blocks for r in group])
            seconds = (time.perf_counter() - start) / len(group)
            for row, (page_table, counts) in zip(group, results, strict=True):
                done.append((row, self._store_pages(row, layer, page_table, counts, seconds)))
        return done

    def _store_pages(self, row: RowPlan, layer: str, page_table: torch.Tensor,
                     counts: torch.Tensor, seconds: float) -> LayerPages:
        state = self.requests[row.req_id]
        state.pages[layer] = LayerPages(page_table=page_table, counts=counts)
        state.window_queries.pop(layer, None)
        self.num_compressed_layers += 1
        state.compress_seconds += seconds
        state.unreported = True
        state.method = (row.cfg or self.cfg).method
        if len(state.pages) == len(row.plan.layer_budgets):  # all layers: report now
            self._report(row.req_id, state, row.plan)
        return state.pages[layer]

    def pages_of(self, req_id: str, layer: str) -> LayerPages:
        state = self.requests.get(req_id)
        if state is None or layer not in state.pages:
            raise RuntimeError(
                f"vllm-adakv: request {req_id!r} has no compressed pages for {layer}; "
                "its blocks were released but this worker never compacted them"
            )
        return state.pages[layer]
