"""CUDA attention backend with compression: vLLM's TRITON_ATTN plus head-wise paged KV.

Registered as ``AttentionBackendEnum.CUSTOM`` and selected on CUDA when
``--kv-compression`` is on. Per step, the metadata builder finds the rows of
compressible requests (``batch.build_step_plan``), uploads one small per-row
table for the rows served head-wise, and hides their released blocks from the
dense kernel (their ``seq_lens`` become their query lengths; that output is
replaced). Per layer, the impl runs vLLM's ``unified_attention`` over the
batch, then (1) keeps the observation-window queries of prompts being
prefilled, (2) scores, selects and compacts the layer of every request whose
prompt completes in this step, all of them in one launch set (Triton scoring,
batched torch selection with Ada-KV's safeguard in Triton, Triton compaction),
and (3) serves compressed rows with the Triton head-wise kernel over their kept
head-pages and tail.

CUDA graphs: decode-only steps (one query token per row, no prompt token in the
batch) run in vLLM's full graphs. Their per-step state lives in persistent
device buffers that the builder rewrites every step (the dense kernel's
clamped ``seq_lens`` and a row table with one row per batch row, empty rows
for requests that are not compressed), so the captured launches read the
current step. Steps with prompt tokens need Python per layer (window queries,
compression) and run with piecewise graphs; ``patches.patch_model_runner``
keeps them out of full graphs even when every row has one token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from typing import ClassVar

import torch
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionCGSupport, CommonAttentionMetadata
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadata,
    TritonAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec
from vllm.v1.kv_cache_layout import KVCacheLayout

from vllm_adakv.config import FP8_KV_CACHE_DTYPES
from vllm_adakv.kernels.decode import ROW_COLUMNS, row_table
from vllm_adakv.kernels.fp8 import is_fp8
from vllm_adakv.kernels.triton_decode import (
    headwise_attention_ranges_triton,
)
from vllm_adakv.methods import get_method
from vllm_adakv.protocol import CompressedAttentionSpec
from vllm_adakv.tensors import host_to_device
from vllm_adakv.worker.backend import (
    CompressedBuilder,
    CompressedImpl,
    compressible_spec,
    dequantize_query,
    layer_scales,
)
from vllm_adakv.worker.batch import RowPlan, StepPlan
from vllm_adakv.worker.compressor import CompressionStore, LayerCache
from vllm_adakv.worker.context import WorkerContext
from vllm_adakv.worker.decode_events import DecodeEvents, EventLayer, Segment
from vllm_adakv.worker.query_ring import QueryRing
from vllm_adakv.worker.range_pool import RangePool
from vllm_adakv.worker.targets import with_targets

logger = logging.getLogger("vllm.adakv")


def range_pool(ctx: WorkerContext, spec: CompressedAttentionSpec, num_slots: int,
               device: torch.device) -> RangePool:
    """The context's page-range pool for ``spec`` (made anew when its shape changes)."""
    shape = (num_slots, spec.num_layers, spec.num_kv_heads)
    pool = ctx.pool
    if (pool is None or pool.shape != shape
            or pool.chunk_base.shape[1] != len(spec.compressed_layers)):
        pool = RangePool(*shape, device=device, num_chunks=len(spec.compressed_layers))
        ctx.pool = pool
    return pool


@dataclass
class AdaKVTritonMetadata(TritonAttentionMetadata):
    """TRITON_ATTN metadata plus this step's compression work."""

    step: StepPlan | None = None
    prefill_rows: list[RowPlan] | None = None  # rows still prefilling their prompt
    query_start_cpu: list[int] | None = None
    headwise_rows: torch.Tensor | None = None  # int32 [R, 7] (see triton_decode.row_table)
    num_headwise_tokens: int = 0
    layer_names: list[str] | None = None  # the compressed layers of this group
    store: CompressionStore | None = None  # this worker's compression state
    pool: RangePool | None = None
    # The block table the head-wise kernel reads, where it differs from ``block_table``
    # (a resumed row compacted into targets in this step: ``worker/targets.py``).
    headwise_block_table: torch.Tensor | None = None
    # Decode-time compression (``worker/decode_events.py``): the query ring and, in
    # decode-only steps, each batch row's index into it (a persistent buffer); in other
    # steps the rows served split at their event points (row, first query offset) and
    # the block table they are read through.
    ring: QueryRing | None = None
    ring_index: torch.Tensor | None = None
    event_rows: list[tuple[RowPlan, int]] | None = None
    event_block_table: torch.Tensor | None = None


class AdaKVTritonMetadataBuilder(CompressedBuilder, TritonAttentionMetadataBuilder):
    platform = "cuda"  # the model's dtype and fp8 (config.compressible_cache_dtypes)
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.ALWAYS

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        # Decode-only steps read persistent buffers (full graphs); steps with
        # prompt tokens run Python per layer (piecewise graphs).
        if isinstance(kv_cache_spec, CompressedAttentionSpec):
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return super().get_cudagraph_support(vllm_config, kv_cache_spec)

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if self.init_compression(layer_names, vllm_config):
            max_rows = vllm_config.scheduler_config.max_num_seqs
            self.pool = range_pool(self.ctx, kv_cache_spec, max_rows, device)
            # Persistent per-step state read by captured decode graphs.
            self.decode_rows = torch.zeros(max_rows, ROW_COLUMNS, dtype=torch.int32,
                                           device=device)
            self.dense_seq_lens = torch.zeros(max_rows, dtype=torch.int32, device=device)
            self.ctx.prompt_free_decode_graphs = True
            self.ring: QueryRing | None = None
            if kv_cache_spec.compression.decode_budget:
                model = vllm_config.model_config
                self.ring = query_ring(
                    self.ctx, kv_cache_spec, max_rows,
                    model.get_num_attention_heads(vllm_config.parallel_config),
                    model.dtype, device)
                self.ring_index = torch.full((max_rows,), self.ring.spare, dtype=torch.long,
                                             device=device)
            self.forward_context = vllm_config.compilation_config.static_forward_context
            _warm_up_kernels(kv_cache_spec, vllm_config, device)

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata
                                    ) -> TritonAttentionMetadata:
        if not self.compressed:
            return super().build_for_cudagraph_capture(common_attn_metadata)
        # A decode-only batch with no compressed request: the captured launches
        # are the same as for any decode step; only the buffers' contents change.
        cm = common_attn_metadata
        n = cm.seq_lens.shape[0]
        seq_lens = self.dense_seq_lens[:n]
        seq_lens.fill_(1)
        rows = self.decode_rows[:n]
        rows.zero_()
        dense = TritonAttentionMetadataBuilder.build(self, 0, replace(cm, seq_lens=seq_lens))
        metadata = self._metadata(dense, step=None, prefill_rows=None, qsl=None,
                                  rows=rows, num_tokens=n)
        if self.ring is not None:
            self.ring_index[:n].fill_(self.ring.spare)
            metadata.ring_index = self.ring_index[:n]
        return metadata

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> TritonAttentionMetadata:
        if not self.compressed:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        cm = common_attn_metadata
        qsl = cm.query_start_loc_cpu.tolist()
        step = self.begin_step(cm)
        self.pool.retain(step.live_req_ids)
        decode_only = cm.max_query_len == 1
        if self.ring is not None:
            self._decode_events_before(step, cm.block_table_tensor)

        # Rows served head-wise: compressed before this step (all their queries),
        # and resumed requests whose chunk runs past the prompt (the later queries).
        # Outside decode-only steps, rows with decode events are served by the impl,
        # split at their event points (``event_rows``).
        table: list[tuple[int, int, int, int, int, int]] = []
        hidden: list[tuple[int, int]] = []
        resumed: list[RowPlan] = []
        event_rows: list[tuple[RowPlan, int]] = []
        event_resumed: list[RowPlan] = []
        for r in step.rows:
            split = r.decode is not None and not decode_only
            if r.compressed_before:
                first = qsl[r.row]
                hidden.append((r.row, r.query_len))
                if split:
                    event_rows.append((r, 0))
                    continue
            elif r.resumed and not r.plan.pooled:
                # (pooled pages are served before compaction by the impl: see forward)
                if split:
                    event_rows.append((r, r.prompt_len - r.context_start))
                    event_resumed.append(r)
                    continue
                first = qsl[r.row] + r.prompt_len - r.context_start
                resumed.append(r)
            else:
                continue
            table.append((r.row, self.pool.slot(r.req_id), first, qsl[r.row + 1],
                          self._tail_start(r), r.seq_len))
        n = cm.seq_lens.shape[0]  # padded to the graph's batch size in full graphs
        if hidden or decode_only:
            # Released blocks must not be read by the dense kernel: it sees only
            # the query tokens of these rows (its output for them is replaced).
            cm = replace(cm, seq_lens=self._dense_seq_lens(cm.seq_lens, hidden))
        dense = super().build(common_prefix_len, cm, fast_build)
        prefill_rows = [r for r in step.rows if not r.compressed_before]
        if decode_only:
            # Every batch row gets a table row (empty when not head-wise), so a
            # captured graph of this batch size reads the whole current table.
            rows = self.decode_rows[:n]
            rows.copy_(_row_table_padded(table, n).pin_memory().to(self.device,
                                                                   non_blocking=True))
            metadata = self._metadata(dense, step, prefill_rows, qsl, rows, n)
            if self.ring is not None:
                metadata.ring_index = self._ring_index(step, n)
            return metadata
        rows = None
        num_tokens = 0
        if table:
            rows = _row_table_padded(table, len(table)).pin_memory().to(self.device,
                                                                        non_blocking=True)
            num_tokens = sum(t[3] - t[2] for t in table)
        metadata = self._metadata(dense, step, prefill_rows, qsl, rows, num_tokens)
        if resumed:
            # Resumed rows' pages are read where this step compacts them (their targets).
            metadata.headwise_block_table = with_targets(dense.block_table, resumed)
        if event_rows:
            metadata.event_rows = event_rows
            metadata.event_block_table = with_targets(dense.block_table, event_resumed)
        return metadata

    def _tail_start(self, row: RowPlan) -> int:
        """The row's first position read through its block table: the prompt's length
        until a decode event moved it (every layer alike between steps)."""
        if row.decode is None or not row.compressed_before:
            return row.prompt_len
        return self.store.pages_of(row.req_id, self.layer_names[0]).tail_start

    def _ring_index(self, step: StepPlan, n: int) -> torch.Tensor:
        """Decode-only step: each batch row's flat index into the query ring (the spare
        slot for rows without decode compression), in the persistent buffer."""
        index = torch.full((n,), self.ring.spare, dtype=torch.long)
        for r in step.rows:
            if r.decode is not None and r.compressed_before:
                index[r.row] = self.ring.index(self.pool.slot(r.req_id), r.context_start)
        out = self.ring_index[:n]
        out.copy_(index.pin_memory().to(self.device, non_blocking=True))
        return out

    def _decode_events_before(self, step: StepPlan, block_table: torch.Tensor) -> None:
        """Give each decode-compressed request its ring views, and run the events due at
        the first position of this step's chunk, for every layer, before the forward.

        These are the events a decode-only step ended with: its graph cannot run them
        (the impl runs the others, split inside a chunk, ``DecodeEvents.serve``). The
        blocks they read behind the window are freed by the scheduler once that step
        was processed, so a later request may have been given them in this step; its
        writes come in this step's forward, queued after these reads."""
        first = self.layer_names[0]
        due = []
        for r in step.rows:
            if r.decode is None:
                continue
            state = self.store.requests[r.req_id]
            if first not in state.recent_queries:
                slot = self.pool.slot(r.req_id)
                for name in self.layer_names:
                    k = pool_chunk(self.store, extract_layer_index(name))
                    state.recent_queries[name] = self.ring.view(k, slot)
            if not r.compressed_before or first not in state.pages:
                continue
            n = r.context_start - r.prompt_len
            if (n >= r.decode.first_event and n % r.decode.interval == 0
                    and state.pages[first].last_event < n):
                due.append(Segment(r, r.context_start, r.context_start, True))
        if not due:
            return
        layers, views = [], []
        for name in self.layer_names:
            layer = self.forward_context[name]
            key, value = layer.impl._split_kv(layer.kv_cache)
            k_scale, _ = layer_scales(layer, key)
            merged, base = self.ctx.views.locate(layer.kv_cache)
            layers.append((name, layer, key, value, k_scale))
            views.append((merged, base, layer.impl.scale))
        view0 = views[0]
        if all(k_scale is None for *_, k_scale in layers) and all(
                v[0] is view0[0] and v[2] == view0[2] for v in views):
            # Every layer's events in one launch set, through the view over all layers'
            # blocks (one set per layer cost ~5 ms of host time for 32 rows on an H100: a
            # decode step of ~0.16 s for 32 layers).
            all_key, all_value = layers[0][1].impl._split_kv(view0[0])
            DecodeEvents.across_layers(
                self.store, [EventLayer(name, extract_layer_index(name), base)
                             for (name, *_), (_, base, _) in zip(layers, views, strict=True)],
                all_key, all_value, block_table, view0[2], self.ring, self.pool.slot,
                on_event=self.pool.store_events).run(due)
            return
        # fp8 (each layer's key scale is one launch's) or layers in separate buffers.
        for name, layer, key, value, k_scale in layers:
            DecodeEvents(self.store, name, extract_layer_index(name), key, value, block_table,
                         layer.impl.scale, k_scale, on_event=self.pool.store_events,
                         ring=self.ring, slot_of=self.pool.slot).run(due)

    def _dense_seq_lens(self, seq_lens: torch.Tensor, hidden: list[tuple[int, int]]
                        ) -> torch.Tensor:
        """``seq_lens`` with the head-wise rows' lengths cut to their query lengths,
        in the persistent buffer (a full graph reads that buffer)."""
        n = seq_lens.shape[0]
        out = self.dense_seq_lens[:n]
        if not hidden:
            out.copy_(seq_lens)
            return out
        clamp = torch.full((n,), -1, dtype=torch.int32)
        for row, q_len in hidden:
            clamp[row] = q_len
        clamp = clamp.pin_memory().to(self.device, non_blocking=True)
        torch.where(clamp >= 0, clamp, seq_lens.to(torch.int32), out=out)
        return out

    def _metadata(self, dense: TritonAttentionMetadata, step: StepPlan | None,
                  prefill_rows: list[RowPlan] | None, qsl: list[int] | None,
                  rows: torch.Tensor | None, num_tokens: int) -> AdaKVTritonMetadata:
        base = {f.name: getattr(dense, f.name) for f in fields(TritonAttentionMetadata)}
        return AdaKVTritonMetadata(**base, step=step, prefill_rows=prefill_rows,
                                   query_start_cpu=qsl, headwise_rows=rows,
                                   num_headwise_tokens=num_tokens,
                                   layer_names=self.layer_names, store=self.store,
                                   pool=self.pool, ring=self.ring)


def query_ring(ctx: WorkerContext, spec: CompressedAttentionSpec, num_slots: int,
               num_q_heads: int, dtype: torch.dtype, device: torch.device) -> QueryRing:
    """The context's query ring for ``spec`` (made anew when its shape changes)."""
    ring = ctx.ring
    shape = (len(spec.compressed_layers), (num_slots + 1) * spec.compression.window,
             num_q_heads, spec.head_size)
    if ring is None or ring.shape != shape or ring.buffer.dtype != dtype:
        ring = QueryRing(len(spec.compressed_layers), num_slots, spec.compression.window,
                         num_q_heads, spec.head_size, dtype, device)
        ctx.ring = ring
    return ring


def pool_chunk(store: CompressionStore, layer_idx: int) -> int:
    """The compressed layer's index in the group (its chunk and ring layer)."""
    return store.layer_indices.index(layer_idx)


def _warm_up_kernels(spec: CompressedAttentionSpec, vllm_config, device) -> None:
    """Compile the compressed path's Triton kernels now, not in the first requests."""
    from vllm.platforms import current_platform

    from vllm_adakv.kernels.warmup import warm_up

    cfg = spec.compression
    model = vllm_config.model_config
    # An fp8 cache reaches the kernels as TRITON_ATTN views it: the platform's fp8 dtype.
    fp8 = vllm_config.cache_config.cache_dtype in FP8_KV_CACHE_DTYPES
    seconds = warm_up(
        torch.device(device), model.dtype,
        model.get_num_attention_heads(vllm_config.parallel_config), spec.num_kv_heads,
        spec.head_size, spec.block_size, cfg.window, cfg.gqa_reduce, cfg.pooling,
        cfg.pool_kernel, cfg.alpha, num_layers=len(spec.compressed_layers),
        # Scoring and allocation always (a request may switch to a scored method), and
        # what the server's method launches.
        families=frozenset({"scoring", "allocation"}) | get_method(cfg.method).kernels,
        gvote_samples=cfg.gvote_samples,
        cache_dtype=current_platform.fp8_dtype() if fp8 else None,
        decode_events=bool(cfg.decode_budget))
    logger.info("vllm-adakv: compiled the compression kernels in %.1f s", seconds)


def _row_table_padded(table: list[tuple[int, int, int, int, int, int]], n: int
                      ) -> torch.Tensor:
    """int32 ``[n, ROW_COLUMNS]`` host table: ``table``'s rows, then empty rows (uploaded
    through pinned memory: a copy from pageable memory may wait for the stream)."""
    cols = torch.zeros(6, n, dtype=torch.int64)
    if table:
        cols[:, : len(table)] = torch.tensor(table, dtype=torch.int64).T
    return row_table(*cols)


class AdaKVTritonImpl(CompressedImpl, TritonAttentionImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                        output_scale, output_block_scale)
        if not isinstance(attn_metadata, AdaKVTritonMetadata):
            return output
        # Under a full CUDA graph only the launches below replay: decode-only steps
        # have no prefill rows, and their row table lives in a persistent buffer.
        if (not attn_metadata.prefill_rows and attn_metadata.headwise_rows is None
                and attn_metadata.event_rows is None):
            return output
        store, pool = attn_metadata.store, attn_metadata.pool
        assert store is not None and pool is not None
        if is_fp8(query.dtype):
            # vLLM's attention layer quantizes the queries for TRITON_ATTN with an fp8 cache
            # (the output keeps the model's dtype): the window queries and the head-wise
            # rows use the values vLLM's kernel attends with.
            query = dequantize_query(query, layer._q_scale, output.dtype)
        layer_name = layer.layer_name
        layer_idx = extract_layer_index(layer_name)
        cache = self.layer_cache(kv_cache, layer, attn_metadata.layer_names, self._split_kv)
        qsl = attn_metadata.query_start_cpu
        block_table = attn_metadata.block_table
        if attn_metadata.prefill_rows:
            assert qsl is not None
            # Resumed own-tensor rows are in the head-wise table (built by the builder).
            done, _ = self.compress_prefills(store, attn_metadata.prefill_rows, layer_name,
                                             layer_idx, query, output, cache, block_table, qsl)
            pool.store_compacted(done)
        heads_q = self.num_heads
        q3 = query.view(query.shape[0], heads_q, self.head_size)
        if attn_metadata.ring_index is not None:
            # Decode-only step (captured in full graphs): keep each row's query.
            index = attn_metadata.ring_index
            attn_metadata.ring.write(pool_chunk(store, layer_idx), index, q3[: index.shape[0]])
        if attn_metadata.event_rows:
            self._serve_events(attn_metadata, store, pool, layer_name, layer_idx, q3, output,
                               cache)
        if attn_metadata.headwise_rows is not None:
            headwise_attention_ranges_triton(
                query.view(query.shape[0], heads_q, self.head_size),
                cache.all_key, cache.all_value,
                pool.page_start[:, layer_idx], pool.kept_counts[:, layer_idx],
                (block_table if attn_metadata.headwise_block_table is None
                 else attn_metadata.headwise_block_table), attn_metadata.headwise_rows,
                attn_metadata.num_headwise_tokens, self.scale,
                output.view(output.shape[0], heads_q, self.head_size),
                chunk_base=pool.chunk_base, capacity=pool.capacity, layer_base=cache.base,
                k_scale=cache.k_scale, v_scale=cache.v_scale,
            )
        return output

    def _serve_events(self, md: AdaKVTritonMetadata, store: CompressionStore, pool: RangePool,
                      layer_name: str, layer_idx: int, q3: torch.Tensor,
                      output: torch.Tensor, cache: LayerCache) -> None:
        """Rows with decode events in a step with prompt tokens: attention split at their
        event points, each layer's events in between (``DecodeEvents.serve``)."""
        assert md.query_start_cpu is not None and md.event_block_table is not None
        qsl = md.query_start_cpu
        table = md.event_block_table
        o3 = output.view(output.shape[0], self.num_heads, self.head_size)

        def attend(segments: list[Segment]) -> None:
            first = [qsl[s.row.row] + s.start - s.row.context_start for s in segments]
            rows = row_table(
                torch.tensor([s.row.row for s in segments]),
                torch.tensor([pool.slot(s.row.req_id) for s in segments]),
                torch.tensor(first),
                torch.tensor([f + s.end - s.start for f, s in zip(first, segments,
                                                                  strict=True)]),
                torch.tensor([store.pages_of(s.row.req_id, layer_name).tail_start
                              for s in segments]),
                torch.tensor([s.end for s in segments]))
            headwise_attention_ranges_triton(
                q3, cache.all_key, cache.all_value, pool.page_start[:, layer_idx],
                pool.kept_counts[:, layer_idx], table, host_to_device(rows, q3.device),
                sum(s.end - s.start for s in segments), self.scale, o3,
                chunk_base=pool.chunk_base, capacity=pool.capacity, layer_base=cache.base,
                k_scale=cache.k_scale, v_scale=cache.v_scale)

        events = DecodeEvents(store, layer_name, layer_idx, cache.key, cache.value, table,
                              self.scale, cache.k_scale, on_event=pool.store_events)
        events.serve(md.event_rows, q3, qsl, attend)

    def _split_kv(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logical key and value views of a ``[nb, H, bs, 2D]`` cache; an fp8 cache's bytes
        viewed as the platform's fp8 dtype, as TRITON_ATTN reads them (every fp8 string)."""
        if self.kv_cache_dtype in FP8_KV_CACHE_DTYPES and kv_cache.dtype != self.fp8_dtype:
            kv_cache = kv_cache.view(self.fp8_dtype)
        return kv_cache[..., : self.head_size], kv_cache[..., self.head_size:]


class AdaKVTritonBackend(TritonAttentionBackend):
    """Registered as CUSTOM; selected on CUDA when compression is on."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # Head-major blocks: each (block, KV head) is one contiguous head-page.
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        return compressible_spec(super().customize_spec(spec))

    @staticmethod
    def get_impl_cls() -> type[AdaKVTritonImpl]:
        return AdaKVTritonImpl

    @staticmethod
    def get_builder_cls() -> type[AdaKVTritonMetadataBuilder]:
        return AdaKVTritonMetadataBuilder


__all__ = ["AdaKVTritonBackend"]
