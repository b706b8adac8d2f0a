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


# Most bytes of compaction scratch one launch set of events across layers takes (each
# event's head-pages of K and V, gathered before they are written back): the layers of a
# step's events are split into sets within it. vLLM's memory profile counts it
# (``WorkerContext.late_device_bytes``). 32 rows of Llama-3.1-8B (prompt 1000) take
# 66 MiB per layer at decode budget 512 (sets of 7 layers), 254 MiB at 2048 (sets of 2).
EVENT_SCRATCH_BYTES = 512 << 20

# Called after the events with one entry per (layer, row) event: the rows, the layers'
# model indices, the new page starts (in the request's page sequence) and counts
# ``[E, H]``: the CUDA backend mirrors them into its tables.
EventHook = Callable[[list[RowPlan], list[int], torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class EventLayer:
    """A layer whose events run: its name, model index and first block in the key and
    value views the events read (0 for the layer's own views)."""

    name: str
    index: int
    base: int = 0


class DecodeEvents:
    """Decode-time events of one layer within its forward (module doc), or of several
    layers at once before a step's forward (``across_layers``).

    On CUDA nothing waits for the device: the candidates are scored in place
    (``kernels.score_decode_event``) and counted with host bounds
    (``LayerPages.known_bound``); elsewhere they are gathered into ``DecodeRows``' dense
    form and checked (``Method.reselect``)."""

    def __init__(self, store: CompressionStore, layer: str, layer_idx: int,
                 key: torch.Tensor, value: torch.Tensor, block_table: torch.Tensor,
                 scale: float, k_scale: torch.Tensor | None = None,
                 on_event: EventHook | None = None, in_place: bool | None = None,
                 ring: QueryRing | None = None, slot_of: Callable[[str], int] | None = None
                 ) -> None:
        self.store = store
        self.layers = [EventLayer(layer, layer_idx)]
        self.key, self.value = key, value  # [nb, H, bs, D] views holding the layers' blocks
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

    @classmethod
    def across_layers(cls, store: CompressionStore, layers: list[EventLayer],
                      all_key: torch.Tensor, all_value: torch.Tensor,
                      block_table: torch.Tensor, scale: float, ring: QueryRing,
                      slot_of: Callable[[str], int], on_event: EventHook | None = None,
                      in_place: bool | None = None) -> DecodeEvents:
        """The events of ``layers`` in one launch set, each (layer, row) one row of it:
        ``all_key``/``all_value`` view every layer's blocks (layer ``l`` from block
        ``l.base``) and each row reads them through its block-table row offset by its
        layer's base, so the single-layer kernels serve every layer (for caches in the
        model's dtype: an fp8 layer's scale is per launch). Window queries from ``ring``."""
        events = cls(store, layers[0].name, layers[0].index, all_key, all_value, block_table,
                     scale, on_event=on_event, in_place=in_place, ring=ring, slot_of=slot_of)
        events.layers = list(layers)
        return events

    @property
    def layer(self) -> str:
        """The one layer of an event run inside its forward."""
        if len(self.layers) != 1:
            raise RuntimeError("vllm-adakv: events across layers run before the forward only")
        return self.layers[0].name

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
        """The event at ``S = seg.end`` of each segment in each layer, batched by settings.
        ``query``/``qsl``: this step's queries (one layer; None: every window query was
        kept before, as for an event run before the step's forward)."""
        if query is not None and len(self.layers) != 1:
            raise RuntimeError("vllm-adakv: events across layers read kept queries only")
        by_row = {s.row.req_id: s for s in due}
        for group in group_by_selection([s.row for s in due], self.store.cfg):
            segs = [by_row[r.req_id] for r in group]
            for layers in self._layer_sets(segs):
                self._event_group(segs, layers, query, qsl)

    def _layer_sets(self, segs: list[Segment]) -> list[list[EventLayer]]:
        """The layers in sets whose compaction scratch (every event's head-pages of K and
        V) stays within ``EVENT_SCRATCH_BYTES``: one launch set each."""
        _, heads, bs, dim = self.key.shape
        per_layer = sum(s.row.decode.page_blocks for s in segs) * heads * bs * 2 * dim \
            * self.key.element_size()
        step = max(1, EVENT_SCRATCH_BYTES // max(per_layer, 1))
        return [self.layers[i:i + step] for i in range(0, len(self.layers), step)]

    def _windows(self, segs: list[Segment], chunks: list[int], window: int,
                 query: torch.Tensor | None, qsl: list[int] | None) -> torch.Tensor:
        """Queries ``[E, w, Hq, D]`` of each event's positions ``[S - w, S)`` (event ``e``:
        segment ``segs[e]`` in compressed layer ``chunks[e]``)."""
        if self.ring is not None and query is None:
            ring = self.ring
            per_layer = ring.shape[1]
            index = [k * per_layer + ring.index(self.slot_of(s.row.req_id), p)
                     for s, k in zip(segs, chunks, strict=True)
                     for p in range(s.end - window, s.end)]
            flat = ring.buffer.flatten(0, 1).index_select(
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

    def _block_table(self, rows: list[RowPlan], layers: list[EventLayer]
                     ) -> tuple[torch.Tensor, list[int]]:
        """The block table the events read and each event's row in it: the step's own
        (batch rows) for one layer at its own views; else the rows' tables once per layer,
        offset by the layer's base (entries past a row's blocks are never read)."""
        if len(layers) == 1 and layers[0].base == 0:
            return self.block_table, [r.row for r in rows]
        dev = self.block_table.device
        own = self.block_table.index_select(0, on_device([r.row for r in rows], torch.long,
                                                         dev))
        bases = on_device([layer.base for layer in layers], self.block_table.dtype, dev)
        table = (own[None] + bases[:, None, None]).flatten(0, 1)
        return table, list(range(table.shape[0]))

    def _event_group(self, segs: list[Segment], layers: list[EventLayer],
                     query: torch.Tensor | None, qsl: list[int] | None) -> None:
        # One event per (layer, row), layer-major.
        store = self.store
        dev = self.key.device
        rows = [s.row for s in segs]
        cfg = rows[0].cfg or store.cfg
        method = get_method(cfg.method)
        w = cfg.window
        heads = self.key.shape[1]
        states = [store.requests[r.req_id] for r in rows]
        chunk_of = {layer.name: store.layer_indices.index(layer.index) for layer in layers}
        ev_layers = [layer for layer in layers for _ in rows]
        ev_segs = segs * len(layers)
        ev_rows = rows * len(layers)
        ev_states = states * len(layers)
        chunks = [chunk_of[layer.name] for layer in ev_layers]
        pages = [s.pages[layer.name] for s, layer in zip(ev_states, ev_layers, strict=True)]
        seq_lens = [s.end for s in ev_segs]
        tails = [p.tail_start for p in pages]
        n_tail = [s - w - t for s, t in zip(seq_lens, tails, strict=True)]
        selectable = [r.decode.layer_budgets[k] - w for r, k in zip(ev_rows, chunks,
                                                                     strict=True)]
        block_table, table_rows = self._block_table(rows, layers)
        num = len(ev_rows)
        table = host_to_device(row_table(
            torch.tensor(table_rows), torch.arange(num), torch.zeros(num), torch.zeros(num),
            torch.tensor(tails), torch.tensor(seq_lens)), dev)
        # One upload for the events' chunk offsets before and after the event.
        capacity = [r.decode.page_blocks * heads for r in ev_rows]
        chunks_d = on_device([[k * capacity_of(p, s, heads) for p, s, k in zip(
            pages, ev_states, chunks, strict=True)],
            [k * c for k, c in zip(chunks, capacity, strict=True)]], torch.int32, dev)
        local = torch.stack([p.page_start for p in pages]) - chunks_d[0][:, None]
        counts = torch.stack([p.counts for p in pages])
        queries = self._windows(ev_segs, chunks, w, query, qsl)
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
                    queries, self.key, local, counts, block_table, table, width,
                    self.scale, gqa_reduce=cfg.gqa_reduce, pooling=cfg.pooling,
                    pool_kernel=cfg.pool_kernel, k_scale=self.k_scale)
            keep = method.select_candidates(scores, num_candidates, selectable, cfg, width)
        else:
            name = self.layer  # (one layer: the CPU backend runs events in its forward)
            width = max(int(counts[i].max()) + n_tail[i] for i in range(num))
            keys, num_candidates, window_keys = kernels.gather_decode_candidates(
                self.key, local, counts, block_table, table, w, width,
                k_scale=self.k_scale)
            positions = torch.stack([
                candidate_positions(s.positions[name], counts[i], tails[i], seq_lens[i], w,
                                    width)
                for i, s in enumerate(states)])
            queries = queries.float()
            keep = method.reselect(DecodeRows(
                cfg=cfg, layer_idx=layers[0].index,
                budgets=[r.decode.layer_budgets[chunks[0]] for r in rows], keys=keys,
                num_candidates=num_candidates, positions=positions, window_keys=window_keys,
                window_queries=queries, seq_lens=seq_lens, scale=self.scale,
                tp_shard=store.tp_shard))
        page_start, kept, _ = kernels.compact_decode_event(
            self.key, self.value, local, counts, block_table, table, keep, w,
            [r.decode.page_blocks for r in ev_rows])
        starts = page_start + chunks_d[1][:, None]
        host, ready = self._counts_to_host(kept)
        for i, (row, state, layer, row_start, row_kept) in enumerate(zip(
                ev_rows, ev_states, ev_layers, starts.unbind(0), kept.unbind(0),
                strict=True)):
            most = selectable[i] if method.uniform else heads * selectable[i]
            state.pages[layer.name] = LayerPages(
                page_start=row_start, counts=row_kept, capacity=capacity[i],
                tail_start=seq_lens[i] - w, last_event=seq_lens[i] - row.prompt_len,
                count_bound=min(most, pages[i].count_bound + n_tail[i]),
                counts_host=None if host is None else host[i], counts_ready=ready)
            if positions is not None:
                state.positions[layer.name] = kept_positions(keep[i], positions[i])
        if self.on_event is not None:
            self.on_event(ev_rows, [layer.index for layer in ev_layers], starts, kept)
        store.num_decode_events += num

    def _counts_to_host(self, kept: torch.Tensor
                        ) -> tuple[torch.Tensor | None, torch.cuda.Event | None]:
        """The event's new counts ``[E, H]`` on their way to the host, for the next
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

