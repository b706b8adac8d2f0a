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

from vllm_adakv import kernels
from vllm_adakv.attention.batch import RowPlan, StepPlan, build_step_plan
from vllm_adakv.attention.compressor import CompressionStore, LayerCache
from vllm_adakv.attention.layer_views import group_blocks
from vllm_adakv.attention.range_pool import RangePool
from vllm_adakv.attention.settings import (
    compressible_spec,
    mark_decode_graphs_need_prompt_free_steps,
    remember_model_settings,
    tensor_parallel_shard,
)
from vllm_adakv.core.spec import CompressedAttentionSpec
from vllm_adakv.kernels.triton_decode import ROW_COLUMNS, row_table

logger = logging.getLogger("vllm.adakv")
_STORE: CompressionStore | None = None
_POOL: RangePool | None = None


def _worker_state(spec: CompressedAttentionSpec, num_slots: int,
                  device: torch.device) -> tuple[CompressionStore, RangePool]:
    """This worker's compression store and page-range pool (one per process)."""
    global _STORE, _POOL
    shape = (num_slots, spec.num_layers, spec.num_kv_heads)
    layers = spec.compressed_layers
    if _STORE is None or _STORE.cfg != spec.compression or _STORE.layer_indices != layers:
        _STORE = CompressionStore(spec.compression, layers, tensor_parallel_shard())
    if (_POOL is None or _POOL.shape != shape
            or _POOL.chunk_base.shape[1] != len(layers)):
        _POOL = RangePool(*shape, device=device, num_chunks=len(layers))
    return _STORE, _POOL


@dataclass
class AdaKVTritonMetadata(TritonAttentionMetadata):
    """TRITON_ATTN metadata plus this step's compression work."""

    step: StepPlan | None = None
    prefill_rows: list[RowPlan] | None = None  # rows still prefilling their prompt
    query_start_cpu: list[int] | None = None
    headwise_rows: torch.Tensor | None = None  # int32 [R, 7] (see triton_decode.row_table)
    num_headwise_tokens: int = 0
    layer_names: list[str] | None = None  # the compressed layers of this group


class AdaKVTritonMetadataBuilder(TritonAttentionMetadataBuilder):
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
        self.compressed = isinstance(kv_cache_spec, CompressedAttentionSpec)
        if self.compressed:
            cache_dtype = str(vllm_config.cache_config.cache_dtype)
            if cache_dtype != "auto":
                raise NotImplementedError(
                    f"vllm-adakv: KV cache dtype {cache_dtype!r} is not supported with "
                    "compression yet (use --kv-cache-dtype auto)"
                )
            max_rows = vllm_config.scheduler_config.max_num_seqs
            self.store, self.pool = _worker_state(kv_cache_spec, max_rows, device)
            self.store.bind_layers({extract_layer_index(n): n for n in layer_names})
            self.layer_names = list(layer_names)
            # Persistent per-step state read by captured decode graphs.
            self.decode_rows = torch.zeros(max_rows, ROW_COLUMNS, dtype=torch.int32,
                                           device=device)
            self.dense_seq_lens = torch.zeros(max_rows, dtype=torch.int32, device=device)
            mark_decode_graphs_need_prompt_free_steps()
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
        return self._metadata(dense, step=None, prefill_rows=None, qsl=None,
                              rows=rows, num_tokens=n, layer_names=self.layer_names)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> TritonAttentionMetadata:
        if not self.compressed:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        cm = common_attn_metadata
        spec = self.kv_cache_spec
        assert isinstance(spec, CompressedAttentionSpec)
        seq_lens_cpu = (cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None
                        else cm.seq_lens.cpu())
        qsl = cm.query_start_loc_cpu.tolist()
        step = build_step_plan(cm.num_reqs, cm.query_start_loc_cpu,
                               seq_lens_cpu[: cm.num_reqs], spec)
        self.store.begin_step(step)
        self.pool.retain(step.live_req_ids)

        # Rows served head-wise: compressed before this step (all their queries),
        # and resumed requests whose chunk runs past the prompt (the later queries).
        table: list[tuple[int, int, int, int, int, int]] = []
        hidden: list[tuple[int, int]] = []
        for r in step.rows:
            if r.compressed_before:
                first = qsl[r.row]
                hidden.append((r.row, r.query_len))
            elif r.completes_prompt and r.seq_len > r.prompt_len and not r.plan.pooled:
                # (pooled pages are served before compaction by the impl: see forward)
                first = qsl[r.row] + r.prompt_len - r.context_start
            else:
                continue
            table.append((r.row, self.pool.slot(r.req_id), first, qsl[r.row + 1],
                          r.prompt_len, r.seq_len))
        decode_only = cm.max_query_len == 1
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
            return self._metadata(dense, step, prefill_rows, qsl, rows, n, self.layer_names)
        rows = None
        num_tokens = 0
        if table:
            rows = _row_table_padded(table, len(table)).pin_memory().to(self.device,
                                                                        non_blocking=True)
            num_tokens = sum(t[3] - t[2] for t in table)
        return self._metadata(dense, step, prefill_rows, qsl, rows, num_tokens,
                              self.layer_names)

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

    @staticmethod
    def _metadata(dense: TritonAttentionMetadata, step: StepPlan | None,
                  prefill_rows: list[RowPlan] | None, qsl: list[int] | None,
                  rows: torch.Tensor | None, num_tokens: int,
                  layer_names: list[str]) -> AdaKVTritonMetadata:
        base = {f.name: getattr(dense, f.name) for f in fields(TritonAttentionMetadata)}
        return AdaKVTritonMetadata(**base, step=step, prefill_rows=prefill_rows,
                                   query_start_cpu=qsl, headwise_rows=rows,
                                   num_headwise_tokens=num_tokens, layer_names=layer_names)


def _warm_up_kernels(spec: CompressedAttentionSpec, vllm_config, device) -> None:
    """Compile the compressed path's Triton kernels now, not in the first requests."""
    from vllm_adakv.kernels.warmup import warm_up

    cfg = spec.compression
    model = vllm_config.model_config
    seconds = warm_up(
        torch.device(device), model.dtype,
        model.get_num_attention_heads(vllm_config.parallel_config), spec.num_kv_heads,
        spec.head_size, spec.block_size, cfg.window, cfg.gqa_reduce, cfg.pooling,
        cfg.pool_kernel, cfg.alpha, num_layers=len(spec.compressed_layers),
        gvote_samples=cfg.gvote_samples if cfg.method == "gvote" else None)
    logger.info("vllm-adakv: compiled the compression kernels in %.1f s", seconds)


def _row_table_padded(table: list[tuple[int, int, int, int, int, int]], n: int
                      ) -> torch.Tensor:
    """int32 ``[n, ROW_COLUMNS]`` host table: ``table``'s rows, then empty rows (uploaded
    through pinned memory: a copy from pageable memory may wait for the stream)."""
    cols = torch.zeros(6, n, dtype=torch.int64)
    if table:
        cols[:, : len(table)] = torch.tensor(table, dtype=torch.int64).T
    return row_table(*cols)


class AdaKVTritonImpl(TritonAttentionImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        remember_model_settings()

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                        output_scale, output_block_scale)
        if not isinstance(attn_metadata, AdaKVTritonMetadata):
            return output
        # Under a full CUDA graph only the launches below replay: decode-only steps
        # have no prefill rows, and their row table lives in a persistent buffer.
        if not attn_metadata.prefill_rows and attn_metadata.headwise_rows is None:
            return output
        assert _STORE is not None and _POOL is not None
        store, pool = _STORE, _POOL
        layer_name = layer.layer_name
        layer_idx = extract_layer_index(layer_name)
        cache = _layer_cache(kv_cache, self.head_size, layer_name, attn_metadata.layer_names)
        qsl = attn_metadata.query_start_cpu
        block_table = attn_metadata.block_table
        completing = []
        for row in attn_metadata.prefill_rows or ():
            assert qsl is not None
            store.stash_window_queries(row, layer_name, query, qsl[row.row])
            if row.completes_prompt:
                completing.append(row)
        if completing:
            # Resumed pooled requests are not in the head-wise table: their tokens after
            # the prompt are served before the pooled compaction (see serve_uncompacted).
            resumed = [r for r in completing if r.seq_len > r.prompt_len and r.plan.pooled]
            q3 = query.view(query.shape[0], self.num_heads, self.head_size)
            o3 = output.view(output.shape[0], self.num_heads, self.head_size)
            # One launch set for every request whose prompt completes in this step.
            done = store.compress_rows(
                completing, layer_name, layer_idx, cache, block_table, self.scale,
                after_selection=(lambda: store.serve_uncompacted(
                    resumed, layer_idx, q3, o3, cache, block_table, qsl, self.scale))
                if resumed else None)
            pool.store_compacted(done)
        if attn_metadata.headwise_rows is not None:
            heads_q = self.num_heads
            kernels.headwise_attention_ranges(
                query.view(query.shape[0], heads_q, self.head_size),
                cache.all_key, cache.all_value,
                pool.page_start[:, layer_idx], pool.kept_counts[:, layer_idx],
                block_table, attn_metadata.headwise_rows,
                attn_metadata.num_headwise_tokens, self.scale,
                output.view(output.shape[0], heads_q, self.head_size),
                chunk_base=pool.chunk_base, capacity=pool.capacity, layer_base=cache.base,
            )
        return output


def _layer_cache(kv_cache: torch.Tensor, head_size: int, layer_name: str,
                 layer_names: list[str]) -> LayerCache:
    """Logical K/V views of this layer (``[num_blocks, H, block_size, 2 * D]``: keys then
    values per token) and of all layers of its buffer."""
    group = group_blocks(kv_cache, layer_names)
    return LayerCache(key=kv_cache[..., :head_size], value=kv_cache[..., head_size:],
                      all_key=group.merged[..., :head_size],
                      all_value=group.merged[..., head_size:],
                      base=group.base_of[layer_name], layer_bases=group.bases)


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
