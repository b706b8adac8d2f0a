"""CUDA attention backend with compression: vLLM's TRITON_ATTN plus head-wise paged KV.

Registered as ``AttentionBackendEnum.CUSTOM`` and selected on CUDA when
``--kv-compression`` is on. Per step, the metadata builder finds the rows of
compressible requests (``batch.build_step_plan``), uploads one small per-row
table for the rows served head-wise, and hides their released blocks from the
dense kernel (their ``seq_lens`` become their query lengths; that output is
replaced). Per layer, the impl runs vLLM's ``unified_attention`` over the
batch, then (1) keeps the observation-window queries of prompts being
prefilled, (2) scores, selects and compacts the layer of every request whose
prompt completes in this step (Triton scoring, torch selection and
compaction), and (3) serves compressed rows with the Triton head-wise kernel
over their kept head-pages and tail.

The per-step Python work needs eager attention: the builder reports no CUDA
graph support for compressed layers, so vLLM keeps piecewise graphs (every
other op of the model stays captured).
"""

from __future__ import annotations

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
from vllm_adakv.attention.compressor import CompressionStore
from vllm_adakv.attention.range_pool import RangePool
from vllm_adakv.attention.settings import compressible_spec, remember_model_settings
from vllm_adakv.core.spec import CompressedAttentionSpec
from vllm_adakv.kernels.triton_decode import row_table

_STORE: CompressionStore | None = None
_POOL: RangePool | None = None


def _worker_state(spec: CompressedAttentionSpec, num_slots: int,
                  device: torch.device) -> tuple[CompressionStore, RangePool]:
    """This worker's compression store and page-range pool (one per process)."""
    global _STORE, _POOL
    shape = (num_slots, spec.num_layers, spec.num_kv_heads)
    if _STORE is None or _STORE.cfg != spec.compression:
        _STORE = CompressionStore(spec.compression)
    if _POOL is None or _POOL.shape != shape:
        _POOL = RangePool(*shape, device=device)
    return _STORE, _POOL


@dataclass
class AdaKVTritonMetadata(TritonAttentionMetadata):
    """TRITON_ATTN metadata plus this step's compression work."""

    step: StepPlan | None = None
    prefill_rows: list[RowPlan] | None = None  # rows still prefilling their prompt
    query_start_cpu: list[int] | None = None
    headwise_rows: torch.Tensor | None = None  # int32 [R, 7] (see triton_decode.row_table)
    num_headwise_tokens: int = 0


class AdaKVTritonMetadataBuilder(TritonAttentionMetadataBuilder):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.ALWAYS

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        # The per-step row plan and per-layer compression run in Python: eager
        # attention (piecewise graphs) for compressed layers.
        if isinstance(kv_cache_spec, CompressedAttentionSpec):
            return AttentionCGSupport.NEVER
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
            self.store, self.pool = _worker_state(
                kv_cache_spec, vllm_config.scheduler_config.max_num_seqs, device
            )

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
            elif r.completes_prompt and r.seq_len > r.prompt_len:
                first = qsl[r.row] + r.prompt_len - r.context_start
            else:
                continue
            table.append((r.row, self.pool.slot(r.req_id), first, qsl[r.row + 1],
                          r.prompt_len, r.seq_len))
        if hidden:
            # Released blocks must not be read by the dense kernel: it sees only
            # the query tokens of these rows (its output for them is replaced).
            idx, q_lens = (torch.tensor(c, dtype=torch.int64) for c in zip(*hidden, strict=True))
            clamped = cm.seq_lens.clone()
            clamped[idx.to(clamped.device, non_blocking=True)] = q_lens.to(
                clamped.device, dtype=clamped.dtype, non_blocking=True)
            cm = replace(cm, seq_lens=clamped)
        dense = super().build(common_prefix_len, cm, fast_build)
        base = {f.name: getattr(dense, f.name) for f in fields(TritonAttentionMetadata)}
        rows = None
        num_tokens = 0
        if table:
            cols = torch.tensor(table, dtype=torch.int64).T
            rows = row_table(*cols).to(self.device, non_blocking=True)
            num_tokens = int((cols[3] - cols[2]).sum())
        prefill_rows = [r for r in step.rows if not r.compressed_before]
        return AdaKVTritonMetadata(**base, step=step, prefill_rows=prefill_rows,
                                   query_start_cpu=qsl,
                                   headwise_rows=rows, num_headwise_tokens=num_tokens)


class AdaKVTritonImpl(TritonAttentionImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        remember_model_settings()

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                        output_scale, output_block_scale)
        if not isinstance(attn_metadata, AdaKVTritonMetadata) or attn_metadata.step is None:
            return output
        if not attn_metadata.prefill_rows and attn_metadata.headwise_rows is None:
            return output
        assert _STORE is not None and _POOL is not None
        store, pool = _STORE, _POOL
        layer_name = layer.layer_name
        layer_idx = extract_layer_index(layer_name)
        # Logical [num_blocks, H, block_size, 2 * D]: keys then values per token.
        key_cache = kv_cache[..., : self.head_size]
        value_cache = kv_cache[..., self.head_size :]
        qsl = attn_metadata.query_start_cpu
        assert qsl is not None
        block_table = attn_metadata.block_table
        for row in attn_metadata.prefill_rows or ():
            store.stash_window_queries(row, layer_name, query, qsl[row.row])
            if row.completes_prompt:
                pages = store.compress_layer(row, layer_name, layer_idx, key_cache, value_cache,
                                             block_table[row.row], self.scale,
                                             compact=kernels.compact_ranges)
                pool.store(row.req_id, layer_idx, pages.page_table, pages.counts)
        if attn_metadata.headwise_rows is not None:
            heads_q = self.num_heads
            kernels.headwise_attention_ranges(
                query.view(query.shape[0], heads_q, self.head_size),
                key_cache, value_cache,
                pool.page_start[:, layer_idx], pool.kept_counts[:, layer_idx],
                block_table, attn_metadata.headwise_rows,
                attn_metadata.num_headwise_tokens, self.scale,
                output.view(output.shape[0], heads_q, self.head_size),
            )
        return output


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
