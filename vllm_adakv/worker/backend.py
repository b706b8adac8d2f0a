"""What the CPU and the CUDA attention backends share, written once.

Each backend extends one of vLLM's (CPU_ATTN, TRITON_ATTN) and adds only what differs:
how a layer's KV tensor splits into logical key and value views, how released blocks
are hidden from vLLM's dense kernel, and the head-wise attention call. The rest is
here: the compressed spec of a layer group (``compressible_spec``), the builder's
per-group set-up and per-step preamble (``CompressedBuilder``), and the impl's per-layer
work on the rows still prefilling (``CompressedImpl``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vllm_adakv.config import check_kv_cache_dtype
from vllm_adakv.kernels.fp8 import is_fp8
from vllm_adakv.protocol import CompressedAttentionSpec
from vllm_adakv.worker.batch import RowPlan, StepPlan, build_step_plan
from vllm_adakv.worker.compressor import CompactedRow, CompressionStore, LayerCache
from vllm_adakv.worker.context import WorkerContext, current
from vllm_adakv.worker.rope import find_rope
from vllm_adakv.worker.targets import group_of

# A layer's KV tensor -> its logical [num_blocks, H, block_size, D] key and value views.
SplitKV = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def compressible_spec(spec: Any) -> Any:
    """``spec`` as a CompressedAttentionSpec when this worker's model compresses it, else
    unchanged. Full-attention layers without a sliding window are compressed; every
    other kind (sliding window, Mamba, cross attention, ...) is left to vLLM."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    ctx = current()
    if not ctx.cfg.enabled or type(spec) is not FullAttentionSpec or spec.sliding_window:
        return spec
    return CompressedAttentionSpec.wrap(spec, ctx.cfg, ctx.num_layers,
                                        ctx.full_attention_layers)


def tensor_parallel_shard() -> tuple[int, int]:
    """(rank, size) of this worker in its tensor-parallel group; (0, 1) without one."""
    from vllm.distributed import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


def compression_store(ctx: WorkerContext, spec: CompressedAttentionSpec) -> CompressionStore:
    """The context's store for ``spec``'s settings (made anew when they change)."""
    store = ctx.store
    if (store is None or store.cfg != spec.compression
            or store.layer_indices != spec.compressed_layers):
        store = CompressionStore(spec.compression, spec.compressed_layers,
                                 tensor_parallel_shard(), ctx.reports,
                                 require_targets=ctx.prefix_caching,
                                 find_rope=lambda name: find_rope(
                                     ctx.runner.model, name, ctx.runner.device))
        ctx.store = store
    return store


def check_cache_dtype(cache_dtype: Any, platform: str) -> None:
    """Compression reads and writes the cache in the model's dtype, and on CUDA fp8 caches
    (``config.compressible_cache_dtypes``); anything else is an error naming the flag.
    Checked again here: vLLM may resolve ``auto`` to a checkpoint's fp8 scheme."""
    check_kv_cache_dtype(cache_dtype, platform)


def layer_scales(layer: Any, cache: torch.Tensor
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The layer's key and value scales (vLLM's ``_k_scale`` / ``_v_scale``, one-element
    float32 tensors on the cache's device, read on the device) for an fp8 ``cache``
    (logical view of the fp8 dtype); (None, None) for any other cache."""
    if not is_fp8(cache.dtype):
        return None, None
    return layer._k_scale, layer._v_scale


def dequantize_query(query: torch.Tensor, q_scale: torch.Tensor, dtype: torch.dtype
                     ) -> torch.Tensor:
    """Queries vLLM quantized to fp8 before the impl (its attention layer does so for an
    fp8 cache on backends that take fp8 queries, TRITON_ATTN on CUDA), as ``dtype`` values:
    ``fp8 * q_scale``, the queries vLLM's own kernel attends with. ``q_scale``: one value,
    or one per KV head (each scaling its group of query heads). ``query``: ``[T, Hq * D]``
    or ``[T, Hq, D]``; the result has its shape."""
    out = query.to(dtype)
    if q_scale.numel() == 1:
        return out * q_scale.to(dtype).reshape(())
    grouped = out.view(out.shape[0], q_scale.numel(), -1)
    return (grouped * q_scale.to(dtype).view(1, -1, 1)).view(query.shape)


class CompressedBuilder:
    """Mixin of a metadata builder: a compressed group's set-up and step preamble."""

    kv_cache_spec: Any
    platform: str  # "cpu" or "cuda": which cache dtypes compression takes

    def init_compression(self, layer_names: list[str], vllm_config: Any) -> bool:
        """Set up this group if its spec is compressed; returns whether it is."""
        self.compressed = isinstance(self.kv_cache_spec, CompressedAttentionSpec)
        if not self.compressed:
            return False
        from vllm.model_executor.models.utils import extract_layer_index

        check_cache_dtype(vllm_config.cache_config.cache_dtype, self.platform)
        self.ctx = current()
        self.store = compression_store(self.ctx, self.kv_cache_spec)
        self.store.bind_layers({extract_layer_index(n): n for n in layer_names})
        self.store.check_scorer()
        self.layer_names = list(layer_names)
        self.group_id: int | None = None  # KV cache group, read at the first step
        return True

    def begin_step(self, cm: Any) -> StepPlan:
        """This step's compressible rows, the store told of them."""
        seq_lens_cpu = (cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None
                        else cm.seq_lens.cpu())
        runner = self.ctx.runner
        if self.group_id is None:
            self.group_id = group_of(runner, self.layer_names[0])
        step = build_step_plan(runner, cm.num_reqs, cm.query_start_loc_cpu,
                               seq_lens_cpu[: cm.num_reqs], self.kv_cache_spec,
                               self.ctx.targets.step.get(self.group_id))
        self.store.begin_step(step)
        return step


class CompressedImpl:
    """Mixin of an attention impl: the per-layer compression work of a step."""

    num_heads: int
    head_size: int
    scale: float

    def layer_cache(self, kv_cache: torch.Tensor, layer: Any, layer_names: list[str],
                    split: SplitKV) -> LayerCache:
        """This layer's logical K/V views and the same over all layers of its buffer (``split``
        views vLLM's raw bytes of an fp8 cache as its fp8 dtype), with the layer's scales
        when the cache is fp8."""
        group = current().views.group_blocks(kv_cache, layer_names)
        key, value = split(kv_cache)
        all_key, all_value = split(group.merged)
        k_scale, v_scale = layer_scales(layer, key)
        return LayerCache(key=key, value=value, all_key=all_key, all_value=all_value,
                          base=group.base_of[layer.layer_name], layer_bases=group.bases,
                          k_scale=k_scale, v_scale=v_scale)

    def compress_prefills(self, store: CompressionStore, rows: list[RowPlan], layer_name: str,
                          layer_idx: int, query: torch.Tensor, output: torch.Tensor,
                          cache: LayerCache, block_table: torch.Tensor, qsl: list[int]
                          ) -> tuple[list[CompactedRow], list[RowPlan]]:
        """Stash the window queries of ``rows`` (still prefilling their prompt) and compress
        this layer of those whose prompt completes now, in one launch set. Returns what was
        compacted and the completing rows. Resumed rows of pooled plans have their tokens
        after the prompt served here, before the pooled compaction moves their pages."""
        completing = []
        for row in rows:
            store.stash_window_queries(row, layer_name, query, qsl[row.row])
            store.add_query_sums(row, layer_name, query, qsl[row.row])
            if row.completes_prompt:
                completing.append(row)
        if not completing:
            return [], []
        resumed = [r for r in completing if r.resumed and r.plan.pooled]
        q3 = query.view(query.shape[0], self.num_heads, self.head_size)
        o3 = output.view(output.shape[0], self.num_heads, self.head_size)
        done = store.compress_rows(
            completing, layer_name, layer_idx, cache, block_table, self.scale,
            after_selection=(lambda: store.serve_uncompacted(
                resumed, layer_idx, q3, o3, cache, block_table, qsl, self.scale))
            if resumed else None)
        return done, completing
