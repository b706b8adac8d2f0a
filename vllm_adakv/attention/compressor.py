"""Worker side: per-request compression state and the per-layer work on it.

Everything here is backend-neutral: it sees a layer's caches as logical
``[num_blocks, H, block_size, D]`` key and value views.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_adakv import kernels
from vllm_adakv.attention.batch import RowPlan, StepPlan
from vllm_adakv.config import KVCompressionConfig
from vllm_adakv.policies import SCORED_METHODS, select_keep_mask


@dataclass
class LayerPages:
    page_table: torch.Tensor  # [H, P] int32 virtual page ids (block * H + slot)
    counts: torch.Tensor  # [H] int32 kept tokens per head


@dataclass
class RequestKV:
    """What one request's compression left on this worker."""

    prompt_len: int
    window_queries: dict[str, torch.Tensor] = field(default_factory=dict)
    pages: dict[str, LayerPages] = field(default_factory=dict)


class CompressionStore:
    """All compressible requests of this worker, by request id."""

    def __init__(self, cfg: KVCompressionConfig) -> None:
        self.cfg = cfg
        self.requests: dict[str, RequestKV] = {}
        self.num_compressed_layers = 0

    def begin_step(self, step: StepPlan) -> None:
        """Drop finished requests; restart requests whose prefill starts over (preemption)."""
        for req_id in [r for r in self.requests if r not in step.live_req_ids]:
            del self.requests[req_id]
        for row in step.rows:
            state = self.requests.get(row.req_id)
            if state is None or row.context_start == 0 or state.prompt_len != row.prompt_len:
                self.requests[row.req_id] = RequestKV(prompt_len=row.prompt_len)

    def stash_window_queries(self, row: RowPlan, layer: str, query: torch.Tensor,
                             token_offset: int) -> None:
        """Keep this chunk's queries of the observation window [L - w, L)."""
        w = self.cfg.window
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

    def keep_mask(self, row: RowPlan, layer: str, layer_idx: int, key_cache: torch.Tensor,
                  block_ids: torch.Tensor, scale: float) -> torch.Tensor:
        cfg = self.cfg
        heads = key_cache.shape[1]
        scores = None
        if cfg.method in SCORED_METHODS:
            scores = kernels.score_window(
                self.requests[row.req_id].window_queries[layer], key_cache, block_ids,
                row.prompt_len, scale, gqa_reduce=cfg.gqa_reduce, pooling=cfg.pooling,
                pool_kernel=cfg.pool_kernel,
            )
        return select_keep_mask(
            cfg.method, scores, num_heads=heads, prompt_len=row.prompt_len, window=cfg.window,
            layer_budget=row.plan.layer_budgets[layer_idx], alpha=cfg.alpha,
            sink_tokens=cfg.sink_tokens,
        )

    def compress_layer(self, row: RowPlan, layer: str, layer_idx: int, key_cache: torch.Tensor,
                       value_cache: torch.Tensor, block_ids: torch.Tensor, scale: float) -> None:
        """Score, select and compact one layer of a request whose prompt just completed."""
        mask = self.keep_mask(row, layer, layer_idx, key_cache, block_ids, scale)
        page_table, counts = kernels.compact(
            key_cache, value_cache, block_ids, mask, row.plan.kept_blocks
        )
        state = self.requests[row.req_id]
        state.pages[layer] = LayerPages(page_table=page_table, counts=counts)
        state.window_queries.pop(layer, None)
        self.num_compressed_layers += 1

    def pages_of(self, req_id: str, layer: str) -> LayerPages:
        state = self.requests.get(req_id)
        if state is None or layer not in state.pages:
            raise RuntimeError(
                f"vllm-adakv: request {req_id!r} has no compressed pages for {layer}; "
                "its blocks were released but this worker never compacted them"
            )
        return state.pages[layer]
