"""Worker side of decode-time compression (``--kv-decode-budget``): events, layer by layer
(docs/decode-compression.md).

A request's ``DecodePlan`` puts an event at every sequence length ``S = L + N`` with
``N = jK >= first_event``. The event of layer ``l`` at ``S`` re-selects each head's kept
set over its kept tokens and the tail outside the window (``Method.reselect``, scored by
the queries of ``[S - w, S)``), compacts what is kept into the head-pages of block-table
entries ``[0, P)`` (``kernels.compact_decode_event``) and moves the layer's tail to
``S - w``. It needs only layer ``l``'s keys and queries of positions ``< S``, so it runs
inside layer ``l``'s forward (``DecodeEvents.serve``): the row's query tokens are split
at its event points; tokens before a point attend over the layout before it, then the
event runs, then the tokens after it attend over the new layout. A decode step whose
sequence reaches ``S`` therefore ends with the event, and a request recomputed after a
preemption, whose chunk runs past several event points, goes through exactly the same
events as it did the first time. The scheduler frees entries ``[P, (S - w) // bs)`` once
the step is processed (``CompressedKVManager._release_decoded``): both sides read the
same plan.

Layout: each layer's head-pages in its own tensor (chunk ``k`` of a request's page
sequence is the ``k``-th compressed layer; after an event a layer's chunk holds
``P * H`` entries: ``LayerPages.capacity``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vllm_adakv import kernels
from vllm_adakv.kernels.decode import row_table
from vllm_adakv.methods import get_method
from vllm_adakv.methods.base import DecodeRows
from vllm_adakv.tensors import host_to_device, on_device
from vllm_adakv.worker.batch import RowPlan
from vllm_adakv.worker.compressor import (
    CompressionStore,
    LayerPages,
    RequestKV,
    group_by_selection,
    kept_positions,
)
from vllm_adakv.worker.query_ring import QueryRing


@dataclass
class Segment:
    """Query tokens ``[start, end)`` (positions) of one row that attend over one layout;
    ``event``: whether the layer's event at ``S = end`` follows them."""

    row: RowPlan
    start: int
    end: int
    event: bool


def event_points(row: RowPlan, after: int, start: int, end: int) -> list[int]:
    """Sequence lengths ``S`` in ``(start, end]`` at which the row's plan has an event
    later than ``after`` generated tokens."""
    plan = row.decode
    if plan is None or end <= row.prompt_len:
        return []
    k = plan.interval
    first = max(plan.first_event, after + 1, start + 1 - row.prompt_len)
    n = -(-first // k) * k
    points = []
    while row.prompt_len + n <= end:
        points.append(row.prompt_len + n)
        n += k
    return points


def segments(row: RowPlan, pages: LayerPages, start: int) -> list[Segment]:
    """The row's query tokens ``[start, seq_len)`` split at its event points."""
    points = event_points(row, pages.last_event, start, row.seq_len)
    cuts = [start, *points]
    out = [Segment(row, a, b, True) for a, b in zip(cuts, points, strict=False) if b > a]
    if cuts[-1] < row.seq_len:
        out.append(Segment(row, cuts[-1], row.seq_len, False))
    return out


# Called after a layer's events with the rows, their new page starts (in the request's
# page sequence) and counts ``[R, H]``: the CUDA backend mirrors them into its tables.
EventHook = Callable[[list[RowPlan], int, torch.Tensor, torch.Tensor], None]


class DecodeEvents:
    """One layer's decode-time events within its forward (module doc).

    On CUDA nothing waits for the device: the candidates are scored in place
    (``kernels.score_decode_event``) and counted with host bounds
    (``LayerPages.count_bound``); elsewhere they are gathered into ``DecodeRows``' dense
    form and checked (``Method.reselect``)."""

    def __init__(self, store: CompressionStore, layer: str, layer_idx: int,
                 key: torch.Tensor, value: torch.Tensor, block_table: torch.Tensor,
                 scale: float, k_scale: torch.Tensor | None = None,
                 on_event: EventHook | None = None, in_place: bool | None = None,
                 ring: QueryRing | None = None, slot_of: Callable[[str], int] | None = None
                 ) -> None:
        self.store = store
        self.layer = layer
        self.layer_idx = layer_idx
        self.k = store.layer_indices.index(layer_idx)  # chunk of this layer's pages
        self.key, self.value = key, value  # the layer's own [nb, H, bs, D] views
        self.block_table = block_table
        self.scale = scale
        self.k_scale = k_scale
        self.on_event = on_event
        # Score in place with host bounds (default: on CUDA; elsewhere the same contract
        # runs on the torch references, which the tests compare with the dense path).
        self.in_place = key.is_cuda if in_place is None else in_place
        # The backend's query ring and its slots (``worker/query_ring.py``): an event run
        # before the step's forward reads all its rows' window queries in one gather.
        self.ring = ring if slot_of is not None else None
        self.slot_of = slot_of

    def serve(self, rows: list[tuple[RowPlan, int]], query: torch.Tensor,
              qsl: list[int], attend: Callable[[list[Segment]], None]) -> None:
        """Attention of ``rows`` (row, first query token offset) split at their event
        points: ``attend(segments)`` serves one round of segments over the current layout,
        then the events that end them run. ``query``: ``[T, Hq, D]``; the queries of the
        generated positions are kept for later events."""
        store = self.store
        pending = [segments(r, store.pages_of(r.req_id, self.layer), r.context_start + skip)
                   for r, skip in rows]
        while any(pending):
            now = [p.pop(0) for p in pending if p]
            attend(now)
            due = [s for s in now if s.event]
            if due:
                self.run(due, query, qsl)
        for row, _ in rows:
            self._keep_queries(row, query, qsl[row.row])

    def run(self, due: list[Segment], query: torch.Tensor | None = None,
            qsl: list[int] | None = None) -> None:
        """This layer's event at ``S = seg.end`` for each segment, batched by settings.
        ``query``/``qsl``: this step's queries (None: every window query was kept before,
        as for an event run before the step's forward)."""
        by_row = {s.row.req_id: s for s in due}
        for group in group_by_selection([s.row for s in due], self.store.cfg):
            self._event_group([by_row[r.req_id] for r in group], query, qsl)

    def _windows(self, segs: list[Segment], window: int, query: torch.Tensor | None,
                 qsl: list[int] | None) -> torch.Tensor:
        """Queries ``[R, w, Hq, D]`` of each segment's positions ``[S - w, S)``."""
        if self.ring is not None and query is None:
            ring = self.ring
            index = [ring.index(self.slot_of(s.row.req_id), p) for s in segs
                     for p in range(s.end - window, s.end)]
            flat = ring.buffer[self.k].index_select(
                0, on_device(index, torch.long, ring.buffer.device))
            return flat.view(len(segs), window, *flat.shape[1:])
        return torch.stack([self._window(s, query, qsl) for s in segs])

    def _window(self, seg: Segment, query: torch.Tensor | None, qsl: list[int] | None
                ) -> torch.Tensor:
        """Queries ``[w, Hq, D]`` of positions ``[S - w, S)``: this step's where it computed
        them, the kept ones before."""
        row = seg.row
        positions = range(seg.end - row.decode.window, seg.end)
        kept = [p for p in positions if p < row.context_start or query is None]
        here = [p for p in positions if p >= row.context_start and query is not None]
        parts = []
        if kept:
            ring = self.store.requests[row.req_id].recent_queries.get(self.layer)
            if ring is None:
                raise RuntimeError(f"vllm-adakv: request {row.req_id!r} has no queries "
                                   f"kept for its decode event at {seg.end}")
            parts.append(ring.index_select(0, on_device([p % ring.shape[0] for p in kept],
                                                        torch.long, ring.device)))
        if here:
            assert query is not None and qsl is not None
            first = qsl[row.row] - row.context_start
            parts.append(query.index_select(0, on_device([first + p for p in here],
                                                         torch.long, query.device)))
        return torch.cat(parts)

    def _keep_queries(self, row: RowPlan, query: torch.Tensor, offset: int) -> None:
        """Keep the last ``w`` queries of this step's generated positions (ring by
        position modulo its size: ``w``, or the server's window where the backend gives
        the ring)."""
        if row.decode is None:
            return
        w = row.decode.window
        lo = max(row.context_start, row.prompt_len, row.seq_len - w)
        if lo >= row.seq_len:
            return
        state = self.store.requests[row.req_id]
        ring = state.recent_queries.get(self.layer)
        if ring is None:
            ring = state.recent_queries[self.layer] = query.new_zeros((w, *query.shape[1:]))
        pos = range(lo, row.seq_len)
        ring.index_copy_(0, on_device([p % ring.shape[0] for p in pos], torch.long,
                                      ring.device),
                         query.index_select(0, on_device([offset + p - row.context_start
                                                          for p in pos], torch.long,
                                                         query.device)))

    def _event_group(self, segs: list[Segment], query: torch.Tensor | None,
                     qsl: list[int] | None) -> None:
        store, name, k = self.store, self.layer, self.k
        dev = self.key.device
        rows = [s.row for s in segs]
        cfg = rows[0].cfg or store.cfg
        method = get_method(cfg.method)
        w = cfg.window
        heads = self.key.shape[1]
        states = [store.requests[r.req_id] for r in rows]
        pages = [s.pages[name] for s in states]
        seq_lens = [s.end for s in segs]
        tails = [p.tail_start for p in pages]
        n_tail = [s - w - t for s, t in zip(seq_lens, tails, strict=True)]
        selectable = [r.decode.layer_budgets[k] - w for r in rows]
        table = host_to_device(row_table(
            torch.tensor([r.row for r in rows]), torch.arange(len(rows)),
            torch.zeros(len(rows)), torch.zeros(len(rows)), torch.tensor(tails),
            torch.tensor(seq_lens)), dev)
        # One upload for the rows' chunk sizes before and after the event.
        capacity = [r.decode.page_blocks * heads for r in rows]
        chunks = on_device([[capacity_of(p, s, heads) for p, s in zip(pages, states,
                                                                       strict=True)],
                            capacity], torch.int32, dev)
        local = torch.stack([p.page_start for p in pages]) - k * chunks[0][:, None]
        counts = torch.stack([p.counts for p in pages])
        queries = self._windows(segs, w, query, qsl)
        positions = None
        if self.in_place:
            # (In the model's dtype: the kernels' dots then run on tensor cores; fp32
            # queries made the scoring 6 ms per layer of 32 rows on an H100.)
            # Scored in place; width from host bounds (no read of the counts).
            width = max(p.known_bound() + n for p, n in zip(pages, n_tail, strict=True))
            num_candidates = counts.long() + on_device(n_tail, torch.long, dev)[:, None]
            scores = None
            if method.decode_scored:
                scores = kernels.score_decode_event(
                    queries, self.key, local, counts, self.block_table, table, width,
                    self.scale, gqa_reduce=cfg.gqa_reduce, pooling=cfg.pooling,
                    pool_kernel=cfg.pool_kernel, k_scale=self.k_scale)
            keep = method.select_candidates(scores, num_candidates, selectable, cfg, width)
        else:
            width = max(int(counts[i].max()) + n_tail[i] for i in range(len(rows)))
            keys, num_candidates, window_keys = kernels.gather_decode_candidates(
                self.key, local, counts, self.block_table, table, w, width,
                k_scale=self.k_scale)
            positions = torch.stack([
                candidate_positions(s.positions[name], counts[i], tails[i], seq_lens[i], w,
                                    width)
                for i, s in enumerate(states)])
            queries = queries.float()
            keep = method.reselect(DecodeRows(
                cfg=cfg, layer_idx=self.layer_idx,
                budgets=[r.decode.layer_budgets[k] for r in rows], keys=keys,
                num_candidates=num_candidates, positions=positions, window_keys=window_keys,
                window_queries=queries, seq_lens=seq_lens, scale=self.scale,
                tp_shard=store.tp_shard))
        page_start, kept, _ = kernels.compact_decode_event(
            self.key, self.value, local, counts, self.block_table, table, keep, w,
            [r.decode.page_blocks for r in rows])
        starts = page_start + k * chunks[1][:, None]
        host, ready = self._counts_to_host(kept)
        for i, (row, state, row_start, row_kept) in enumerate(zip(
                rows, states, starts.unbind(0), kept.unbind(0), strict=True)):
            most = selectable[i] if method.uniform else heads * selectable[i]
            state.pages[name] = LayerPages(
                page_start=row_start, counts=row_kept, capacity=capacity[i],
                tail_start=seq_lens[i] - w, last_event=seq_lens[i] - row.prompt_len,
                count_bound=min(most, pages[i].count_bound + n_tail[i]),
                counts_host=None if host is None else host[i], counts_ready=ready)
            if positions is not None:
                state.positions[name] = kept_positions(keep[i], positions[i])
        if self.on_event is not None:
            self.on_event(rows, self.layer_idx, starts, kept)
        store.num_decode_events += len(rows)


    def _counts_to_host(self, kept: torch.Tensor
                        ) -> tuple[torch.Tensor | None, torch.cuda.Event | None]:
        """The event's new counts ``[R, H]`` on their way to the host, for the next
        event's candidate widths (``LayerPages.known_bound``): on CUDA a non-blocking copy
        into pinned memory and its CUDA event; elsewhere the counts themselves."""
        if not kept.is_cuda:
            return kept, None
        host = torch.empty(kept.shape, dtype=kept.dtype, pin_memory=True)
        host.copy_(kept, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return host, ready


def capacity_of(pages: LayerPages, state: RequestKV, heads: int) -> int:
    """Entries per chunk of the request's page sequence for this layer's pages."""
    return pages.capacity if pages.capacity is not None else int(state.kept_blocks) * heads


def candidate_positions(kept: torch.Tensor, counts: torch.Tensor, tail_start: int,
                        seq_len: int, window: int, width: int) -> torch.Tensor:
    """``[H, width]`` true positions of one row's candidates: each head's kept positions
    (``kept[h, :counts[h]]``), then the tail ``[tail_start, S - w)`` (padding: -1)."""
    out = torch.full((counts.shape[0], width), -1, dtype=torch.long, device=kept.device)
    tail = torch.arange(tail_start, seq_len - window, device=out.device)
    for h, n in enumerate(counts.tolist()):
        out[h, :n] = kept[h, :n]
        out[h, n : n + tail.numel()] = tail
    return out

