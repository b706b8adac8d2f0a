"""Worker side: per-request compression state and the per-layer work on it.

Everything here is backend-neutral: it sees a layer's caches as logical
``[num_blocks, H, block_size, D]`` key and value views, plus views over all layers'
blocks of the same buffer (``LayerCache``) where head-pages are pooled across layers.

Compaction: a request whose plan keeps each layer in its own tensor is compacted layer
by layer, right after that layer's attention in the step that completes its prompt. A
pooled plan (``CompressionPlan.pooled``) keeps each layer's keep mask until the group's
last layer of that step, then compacts all layers at once
(``kernels.compact_pooled_rows``). Either way a request's pages are described the same
way: head h of layer l owns ``ceil(counts / bs)`` consecutive entries from ``page_start``
of the request's pooled sequence, whose chunk k (``capacity`` entries) lies in the layer
tensor at block offset ``chunk_base[k]``.
"""

from __future__ import annotations

import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vllm_adakv import kernels, metrics
from vllm_adakv.config import KVCompressionConfig
from vllm_adakv.kernels.expected import RopeTable, future_moments
from vllm_adakv.memory import CompressionPlan, PageUsage, page_usage
from vllm_adakv.methods import LayerRows, get_method
from vllm_adakv.methods.scorers import FIRST_POSITIONS_SKIPPED, FUTURE_POSITIONS, SCORERS
from vllm_adakv.tensors import on_device
from vllm_adakv.worker.batch import RowPlan, StepPlan
from vllm_adakv.worker.reports import KeptBlockPosts

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
    page_start: torch.Tensor  # [H] int32 first entry of each head in the pooled sequence
    counts: torch.Tensor  # [H] int32 kept tokens per head
    # Decode-time compression (``worker/decode_events.py``): entries per chunk of the
    # page sequence once an event wrote the layer (None: the request's kept blocks * H),
    # the first position read through the block table (the prompt's length until an
    # event, then ``S - w``) and the generated tokens at the layer's last event.
    capacity: int | None = None
    tail_start: int = 0
    last_event: int = -1
    # A host bound on ``counts`` (no device read: it sizes a decode event's candidates),
    # and the counts' host copy queued after a decode event (pinned, non-blocking on CUDA)
    # with the CUDA event that marks it done: the next event tightens the bound with it
    # once it has arrived (it arrives steps before; a late copy is not waited for).
    count_bound: int = 0
    counts_host: torch.Tensor | None = None
    counts_ready: torch.cuda.Event | None = None

    def known_bound(self) -> int:
        """``count_bound``, tightened to the counts' largest value once their host copy
        is there (candidate widths only pad: the selection is the same either way)."""
        host = self.counts_host
        if host is not None and (self.counts_ready is None or self.counts_ready.query()):
            self.count_bound = min(self.count_bound, int(host.max()))
            self.counts_host = self.counts_ready = None
        return self.count_bound


@dataclass
class LayerCache:
    """One layer's KV cache as the compressor sees it."""

    key: torch.Tensor  # this layer's logical [num_blocks, H, bs, D] views
    value: torch.Tensor
    all_key: torch.Tensor  # the same buffer over every layer's blocks
    all_value: torch.Tensor
    base: int  # this layer's first block in ``all_key``
    layer_bases: torch.Tensor  # [K] int32 first block of each compressed layer (group order)
    # fp8 caches: the layer's key and value scales (one-element float32 on the cache's
    # device, ``kernels/fp8.py``); None for caches in the model's dtype.
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


@dataclass
class CompactedRow:
    """Pages one compaction wrote for one request (one layer, or all layers if pooled)."""

    row: RowPlan
    layers: list[int]  # model layer indices of ``page_start``/``counts``
    page_start: torch.Tensor  # [len(layers), H] int32
    counts: torch.Tensor  # [len(layers), H] int32
    chunk_base: torch.Tensor  # [K] int32
    capacity: torch.Tensor  # 0-d int32: entries per chunk (kept blocks * H)


@dataclass
class RequestKV:
    """What one request's compression left on this worker."""

    prompt_len: int
    window_queries: dict[str, torch.Tensor] = field(default_factory=dict)
    # Expected scorer: per layer, the sums of the prompt's queries before RoPE and of their
    # outer products ([Hq, D], [Hq, D, D]) and how many (``add_query_sums``), until the
    # layer is compacted.
    query_sums: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=dict)
    pages: dict[str, LayerPages] = field(default_factory=dict)
    # Pooled plans: keep masks [H, L] by model layer index, until the group's last layer.
    pending_masks: dict[int, torch.Tensor] = field(default_factory=dict)
    chunk_base: torch.Tensor | None = None  # [K] int32, set by the compaction
    kept_blocks: torch.Tensor | int = 0  # blocks the pages use (measured plans: reported)
    # Compression time summed over layers, reported to the metrics with the kept tokens
    # once all layers are done (or, where a worker holds only some layers, next step).
    compress_seconds: float = 0.0
    unreported: bool = False
    method: str = ""  # the request's effective method
    # Decode-time compression (``worker/decode_events.py``), by layer: the last ``w``
    # queries of the generated positions by position modulo ``w`` (``[w, Hq, D]``), and
    # each head's kept positions in page order (``[H, n]``, padded).
    recent_queries: dict[str, torch.Tensor] = field(default_factory=dict)
    positions: dict[str, torch.Tensor] = field(default_factory=dict)



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
    kept_blocks: torch.Tensor  # [1] blocks the pages use, on the host likewise
    event: torch.cuda.Event | None

    @classmethod
    def start(cls, req_id: str, state: RequestKV, plan: CompressionPlan | None
              ) -> _KeptCounts:
        counts = torch.stack([p.counts for p in state.pages.values()])
        # Own-tensor plans know their blocks on the host (an int); pooled plans (GVote's
        # measured ones among them) have them on the device, next to the counts. An int is
        # never uploaded: a copy from pageable memory waits for the stream, i.e. for the
        # whole prefill.
        on_host = not isinstance(state.kept_blocks, torch.Tensor)
        blocks = torch.as_tensor(state.kept_blocks, dtype=torch.int32).reshape(1)
        event = None
        if counts.is_cuda:
            parts = [counts.flatten().to(torch.int32)]
            if not on_host:
                parts.append(blocks.to(torch.int32))
            both = torch.cat(parts)
            host = torch.empty(both.shape, dtype=torch.int32, pin_memory=True)
            host.copy_(both, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            counts = host[: counts.numel()].view(counts.shape)
            if not on_host:
                blocks = host[counts.numel():]
        return cls(req_id, state.method, state.prompt_len, state.compress_seconds, plan,
                   counts, blocks, event)

    def ready(self) -> bool:
        return self.event is None or self.event.query()


def kept_positions(mask: torch.Tensor, positions: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Each head's kept positions in increasing order, ``[H, max kept]`` (padding after
    each head's count), from a keep mask ``[H, W]`` over increasing ``positions``
    (``[H, W]``; default: ``0..W-1``)."""
    if positions is None:
        positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    pad = torch.iinfo(torch.long).max
    ordered = torch.sort(torch.where(mask, positions.long(), pad), dim=-1).values
    most = int(mask.sum(-1).max()) if mask.numel() else 0
    return ordered[:, :most]


def prompt_count_bound(prompt_len: int, budget: int, window: int, heads: int,
                       uniform: bool) -> int:
    """Most tokens one head keeps of a compressed prompt: the layer's budget (window
    included) for uniform methods; the window plus the layer's whole selection otherwise."""
    return min(prompt_len, budget if uniform else window + heads * (budget - window))


def selection_key(cfg: KVCompressionConfig) -> tuple:
    """The settings that must agree for requests to share one selection launch (all but
    the budget, which each row carries in its plan)."""
    return (cfg.method, cfg.window, cfg.scorer, cfg.gqa_reduce, cfg.pooling, cfg.pool_kernel,
            cfg.alpha, cfg.sink_tokens, cfg.gvote_samples, cfg.gvote_p, cfg.gvote_seed)


def sums_queries(cfg: KVCompressionConfig) -> bool:
    """Whether ``cfg``'s selection reads the prompt's query sums (the expected scorer of a
    method that takes a scorer)."""
    return get_method(cfg.method).takes_scorer and SCORERS[cfg.scorer].needs_query_sums


def group_by_selection(rows: list[RowPlan], default: KVCompressionConfig
                       ) -> list[list[RowPlan]]:
    """``rows`` grouped by ``selection_key`` of their effective settings, in first-seen order."""
    groups: dict[tuple, list[RowPlan]] = {}
    for row in rows:
        groups.setdefault(selection_key(row.cfg or default), []).append(row)
    return list(groups.values())


class CompressionStore:
    """All compressible requests of this worker, by request id."""

    def __init__(self, cfg: KVCompressionConfig, layer_indices: tuple[int, ...],
                 tp_shard: tuple[int, int] = (0, 1), reports: KeptBlockPosts | None = None,
                 require_targets: bool = False,
                 find_rope: Callable[[str], RopeTable] | None = None) -> None:
        self.cfg = cfg
        # The expected scorer's rotary tables, by layer name (``worker/rope.py``).
        self._find_rope = find_rope
        self._ropes: dict[str, RopeTable] = {}
        # Prefix caching on: a request's own first blocks may be shared or hashed, so every
        # compaction writes into the targets the scheduler sent (``worker/targets.py``).
        self.require_targets = require_targets
        # Where kept-block reports of measured plans go (the worker context's queue).
        self.reports = reports if reports is not None else KeptBlockPosts()
        self.tp_shard = tp_shard  # (rank, size): this worker's share of the heads
        self.layer_indices = tuple(layer_indices)  # compressed layers, model indices
        self.last_layer = max(self.layer_indices)
        self.requests: dict[str, RequestKV] = {}
        self.num_compressed_layers = 0
        self.num_decode_events = 0  # (request, layer) decode events applied
        # req_id -> reserved vs filled head-pages, once all its layers are compacted
        self._page_usage: OrderedDict[str, PageUsage] = OrderedDict()
        self._pending: list[_KeptCounts] = []
        self.record_dir = os.environ.get(RECORD_KEPT_ENV) or None
        self._layer_names: dict[int, str] = {}

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
                blocks = int(item.kept_blocks[0])
                if item.plan.measured:
                    self.reports.post(item.req_id, blocks)
                self._page_usage[item.req_id] = page_usage(item.plan, item.counts.tolist(),
                                                           blocks)
                self._page_usage.move_to_end(item.req_id)
                while len(self._page_usage) > MAX_USAGE_RECORDS:
                    self._page_usage.popitem(last=False)
        self._pending = keep

    def begin_step(self, step: StepPlan) -> None:
        """Drop finished requests; restart requests whose prefill starts over (preemption:
        from the start, or from a prefix-cache hit once compressed before).

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
            if (state is None or row.context_start == 0 or state.prompt_len != row.prompt_len
                    or (not row.compressed_before and (state.pages or state.pending_masks))):
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

    def check_scorer(self) -> None:
        """The server's expected scorer finds every compressed layer's rotary table now
        (ValueError naming the flag at start-up, not at a request)."""
        if sums_queries(self.cfg):
            for name in self._layer_names.values():
                self.rope(name)

    def rope(self, layer: str) -> RopeTable:
        """The rotary table of ``layer`` (found once)."""
        table = self._ropes.get(layer)
        if table is None:
            if self._find_rope is None:
                raise ValueError("--kv-scorer expected needs the model's rotary embedding; "
                                 "this worker was given no way to find it")
            table = self._ropes[layer] = self._find_rope(layer)
        return table

    def add_query_sums(self, row: RowPlan, layer: str, query: torch.Tensor,
                       token_offset: int) -> None:
        """Expected scorer: add this chunk's prompt queries ``[T, Hq, D]``, rotated back to
        before RoPE, to the row's running first and second moments; the first
        ``FIRST_POSITIONS_SKIPPED`` positions are left out (but never the whole prompt)."""
        if not sums_queries(row.cfg or self.cfg):
            return
        lo = max(row.context_start, min(FIRST_POSITIONS_SKIPPED, row.prompt_len - 1))
        hi = min(row.seq_len, row.prompt_len)
        if lo >= hi:
            return
        rope = self.rope(layer)
        start = token_offset + (lo - row.context_start)
        total, second = kernels.unrotated_moments(
            query[start : start + hi - lo], torch.arange(lo, hi, device=query.device),
            rope.cos_sin, rope.rotary_dim, rope.neox)
        state = self.requests[row.req_id]
        before = state.query_sums.get(layer)
        if before is not None:
            total, second = total + before[0], second + before[1]
            hi += before[2]
        state.query_sums[layer] = (total, second, hi - lo)

    def future_moments(self, rows: list[RowPlan], layer: str
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Expected scorer: each row's query Gaussian moved to the positions after its
        prompt (``kernels.expected.future_moments``): means ``[R, 1, Hq, D]`` and
        covariances ``[R, Hq, D, D]`` (fp32; float64 for float64 queries)."""
        rope = self.rope(layer)
        means, covs = [], []
        for row in rows:
            total, second, count = self.requests[row.req_id].query_sums[layer]
            mu, sigma = future_moments(total, second, count, row.prompt_len, FUTURE_POSITIONS,
                                       rope.cos_sin, rope.rotary_dim, rope.neox)
            means.append(mu)
            covs.append(sigma)
        return torch.stack(means)[:, None], torch.stack(covs)

    def keep_masks(self, rows: list[RowPlan], layer: str, layer_idx: int,
                   key_cache: torch.Tensor, block_table: torch.Tensor, scale: float,
                   k_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Keep masks ``[R, H, Lmax]`` of one layer for rows that share their settings but
        the budget (``selection_key``): one batched selection by their method. ``k_scale``:
        the key scale of an fp8 ``key_cache``."""
        cfg = rows[0].cfg or self.cfg
        method = get_method(cfg.method)
        queries = future = None
        if method.needs_window_queries:
            queries = torch.stack([self.requests[r.req_id].window_queries[layer] for r in rows])
        covariances = None
        if sums_queries(cfg):
            future, covariances = self.future_moments(rows, layer)
        return method.keep_masks(LayerRows(
            cfg=cfg, layer_idx=layer_idx, prompt_lens=[r.prompt_len for r in rows],
            budgets=[r.plan.layer_budgets[layer_idx] for r in rows], key_cache=key_cache,
            block_table=block_table, rows=[r.row for r in rows], scale=scale,
            window_queries=queries, future_queries=future,
            future_covariances=covariances, tp_shard=self.tp_shard,
            k_scale=k_scale))

    def compress_rows(self, rows: list[RowPlan], layer: str, layer_idx: int,
                      cache: LayerCache, block_table: torch.Tensor, scale: float,
                      after_selection: Callable[[], None] | None = None
                      ) -> list[CompactedRow]:
        """Select one layer of every request whose prompt completes in this step, and
        compact what is due: the layer itself for plans that keep layers in their own
        tensors; at the group's last layer, every layer of the pooled plans. Requests
        with the same settings (but the budget) share each launch. ``after_selection``
        runs before the pooled compaction, while pooled requests' kept tokens are still
        where the prompt put them (``pending_mask``)."""
        done: list[CompactedRow] = []
        pooled: list[RowPlan] = []
        for group in group_by_selection(rows, self.cfg):
            start = time.perf_counter()
            masks = self.keep_masks(group, layer, layer_idx, cache.key, block_table, scale,
                                    cache.k_scale)
            if self.record_dir is not None:
                for i, row in enumerate(group):
                    record_kept(self.record_dir, row.req_id, layer_idx,
                                masks[i, :, : row.prompt_len])
            own = [i for i, row in enumerate(group) if not row.plan.pooled]
            for i, row in enumerate(group):
                if row.plan.pooled:
                    mask = masks[i, :, : row.prompt_len]
                    self.requests[row.req_id].pending_masks[layer_idx] = mask
                    pooled.append(row)
            if own:
                # masks[list] would upload the list from pageable memory: a host sync
                own_masks = (masks if len(own) == len(group) else masks.index_select(
                    0, on_device(own, torch.long, masks.device)))
                done += self._compact_own([group[i] for i in own], own_masks, layer,
                                          layer_idx, cache, block_table)
            seconds = (time.perf_counter() - start) / len(group)
            for row in group:
                self.requests[row.req_id].compress_seconds += seconds
        if after_selection is not None:
            after_selection()
        if layer_idx == self.last_layer and pooled:
            done += self._compact_pooled(pooled, cache, block_table)
        return done

    def _compact_own(self, rows: list[RowPlan], masks: torch.Tensor, layer: str, layer_idx: int,
                     cache: LayerCache, block_table: torch.Tensor) -> list[CompactedRow]:
        """Compact one layer into its own tensor: chunk k of the pooled sequence is the
        k-th compressed layer, so this layer's entries start at ``k * capacity``."""
        k = self.layer_indices.index(layer_idx)
        results = kernels.compact_rows_ranges(
            cache.key, cache.value, block_table, [r.row for r in rows], masks,
            [r.plan.kept_blocks for r in rows],
            dst_blocks=self._destinations(rows, cache.key.device))
        done = []
        heads = cache.key.shape[1]
        # Chunk k holds this layer's entries: the kept blocks' or, under decode-time
        # compression, the P blocks every later event writes into (so that a chunk's
        # capacity never changes and the device tables stay valid between layers).
        blocks = [r.plan.kept_blocks if r.decode is None else r.decode.page_blocks
                  for r in rows]
        capacities = on_device([b * heads for b in blocks], torch.int32, cache.key.device)
        for i, (row, (page_start, counts)) in enumerate(zip(rows, results, strict=True)):
            state = self.requests[row.req_id]
            state.chunk_base = cache.layer_bases
            state.kept_blocks = row.plan.kept_blocks
            if row.decode is not None and not masks.is_cuda:
                # The dense event path's candidate positions (the CUDA path reads none).
                state.positions[layer] = kept_positions(masks[i, :, : row.prompt_len])
            entry = CompactedRow(row, [layer_idx], (page_start + k * blocks[i] * heads)[None],
                                 counts[None], cache.layer_bases, capacities[i])
            self._store_pages(entry, [layer])
            if row.decode is not None:
                pages = state.pages[layer]
                pages.capacity = blocks[i] * heads
                pages.count_bound = prompt_count_bound(
                    row.prompt_len, row.plan.layer_budgets[layer_idx], row.decode.window,
                    heads, get_method((row.cfg or self.cfg).method).uniform)
            done.append(entry)
        return done

    def _compact_pooled(self, rows: list[RowPlan], cache: LayerCache, block_table: torch.Tensor
                        ) -> list[CompactedRow]:
        """Compact every layer of the pooled rows at once (the group's last layer)."""
        start = time.perf_counter()
        heads = cache.key.shape[1]
        width = max(r.prompt_len for r in rows)
        masks = torch.zeros(len(rows), len(self.layer_indices), heads, width, dtype=torch.bool,
                            device=cache.key.device)
        for i, row in enumerate(rows):
            pending = self.requests[row.req_id].pending_masks
            missing = [idx for idx in self.layer_indices if idx not in pending]
            if missing:
                raise RuntimeError(
                    f"vllm-adakv: request {row.req_id!r} reached its last layer without keep "
                    f"masks of layers {missing}; pooled compaction needs all of them")
            for k, idx in enumerate(self.layer_indices):
                masks[i, k, :, : row.prompt_len] = pending[idx]
        page_start, counts, chunk_layer, kept_blocks = kernels.compact_pooled_rows(
            cache.all_key, cache.all_value, block_table, [r.row for r in rows], masks,
            cache.layer_bases, [None if r.plan.measured else r.plan.kept_blocks for r in rows],
            dst_blocks=self._destinations(rows, cache.key.device))
        chunk_base = cache.layer_bases.to(chunk_layer.device)[chunk_layer.long()]
        capacity = kept_blocks * heads
        names = [self._layer_names[idx] for idx in self.layer_indices]
        seconds = (time.perf_counter() - start) / len(rows)
        done = []
        for i, row in enumerate(rows):
            state = self.requests[row.req_id]
            state.pending_masks.clear()
            state.chunk_base = chunk_base[i]
            state.kept_blocks = kept_blocks[i]
            state.compress_seconds += seconds
            entry = CompactedRow(row, list(self.layer_indices), page_start[i], counts[i],
                                 chunk_base[i], capacity[i])
            self._store_pages(entry, names)
            done.append(entry)
        return done

    def _destinations(self, rows: list[RowPlan], device: torch.device) -> torch.Tensor | None:
        """The compaction targets of ``rows`` as a ``[R, W]`` block-id table (padded with
        each row's first target), or None to compact into their own first blocks."""
        targets = [r.targets for r in rows]
        missing = [r.req_id for r in rows if r.targets is None]
        if len(missing) == len(rows) and not self.require_targets:
            return None
        if missing:
            raise RuntimeError(
                f"vllm-adakv: requests {missing} complete their prompt without compaction "
                "targets; with prefix caching their own blocks may be shared")
        width = max(len(t) for t in targets)
        return on_device([t + t[:1] * (width - len(t)) for t in targets], torch.int32, device)

    def _store_pages(self, entry: CompactedRow, layers: list[str]) -> None:
        row = entry.row
        state = self.requests[row.req_id]
        for name, start, counts in zip(layers, entry.page_start, entry.counts, strict=True):
            state.pages[name] = LayerPages(page_start=start, counts=counts,
                                           tail_start=row.prompt_len)
            state.window_queries.pop(name, None)
            state.query_sums.pop(name, None)
            self.num_compressed_layers += 1
        state.unreported = True
        state.method = (row.cfg or self.cfg).method
        if len(state.pages) == len(self.layer_indices):  # all layers: report now
            self._report(row.req_id, state, row.plan)

    def bind_layers(self, names: dict[int, str]) -> None:
        """The compressed layers' names by model index (from the backend's layer group);
        they must be the layers the plan pools over."""
        if tuple(sorted(names)) != self.layer_indices:
            raise RuntimeError(
                f"vllm-adakv: this worker compresses layers {sorted(names)} but the memory "
                f"plan covers layers {list(self.layer_indices)}; pipeline parallelism and "
                "layer groups that split the compressed layers are not supported")
        self._layer_names = dict(names)

    def serve_uncompacted(self, rows: list[RowPlan], layer_idx: int, query: torch.Tensor,
                          output: torch.Tensor, cache: LayerCache, block_table: torch.Tensor,
                          query_start: list[int], scale: float) -> None:
        """Attention of resumed pooled requests' tokens after their prompt (``rows`` whose
        step chunk runs past it), over the kept tokens where the prompt put them: pooled
        pages are compacted only at the group's last layer. query/output: ``[T, Hq, D]``.
        Torch (rare: a request recomputed after preemption)."""
        for row in rows:
            mask = self.pending_mask(row.req_id, layer_idx)
            if mask is None or row.seq_len <= row.prompt_len:
                continue
            first = query_start[row.row] + row.prompt_len - row.context_start
            tokens = slice(first, query_start[row.row] + row.query_len)
            kernels.masked_prompt_attention_reference(
                query[tokens], cache.key, cache.value, block_table[row.row], mask, row.seq_len,
                scale, output[tokens], k_scale=cache.k_scale, v_scale=cache.v_scale)

    def pending_mask(self, req_id: str, layer_idx: int) -> torch.Tensor | None:
        """The keep mask ``[H, L]`` of a pooled request's layer not compacted yet."""
        state = self.requests.get(req_id)
        return None if state is None else state.pending_masks.get(layer_idx)

    def pages_of(self, req_id: str, layer: str) -> LayerPages:
        state = self.requests.get(req_id)
        if state is None or layer not in state.pages:
            raise RuntimeError(
                f"vllm-adakv: request {req_id!r} has no compressed pages for {layer}; "
                "its blocks were released but this worker never compacted them"
            )
        return state.pages[layer]
