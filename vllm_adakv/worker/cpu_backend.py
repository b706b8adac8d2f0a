"""CPU attention backend with compression: vLLM's CPU_ATTN plus head-wise paged KV.

Uncompressed requests run vLLM's own CPU kernel unchanged. For compressible
requests the backend also (1) keeps the observation-window queries while the
prompt is prefilled, (2) compresses each layer right after the attention of
the step that completes the prompt, and (3) serves every later query of those
requests with the head-wise reference kernel (kept head-pages + tail).
With ``--kv-compression none`` every method defers to the parent class.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from vllm_adakv import kernels
from vllm_adakv.kernels.decode import row_table
from vllm_adakv.worker.backend import CompressedBuilder, CompressedImpl, compressible_spec
from vllm_adakv.worker.batch import StepPlan
from vllm_adakv.worker.compressor import CompressionStore, LayerCache
from vllm_adakv.worker.decode_events import DecodeEvents, Segment, capacity_of
from vllm_adakv.worker.targets import with_targets

# Per-head-page layouts this backend can read and write (see logical_kv_views).
SUPPORTED_ISAS = ("vec", "vec16")


def logical_kv_views(kv_cache: torch.Tensor, isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value caches as logical ``[num_blocks, H, block_size, D]`` views.

    vLLM's CPU cache is ``[num_blocks, H, block_size, 2 * D]``: each head-page
    holds block_size keys then block_size values. With the vec/vec16 ISAs the
    keys of a head-page are stored transposed (``[D, block_size]``), values not.
    """
    if isa not in SUPPORTED_ISAS:
        raise NotImplementedError(
            f"vllm-adakv: the CPU attention ISA {isa!r} packs keys in a layout this "
            f"version cannot compact (supported: {SUPPORTED_ISAS}); run with "
            "--dtype float32 or float16"
        )
    num_blocks, heads, block_size, two_d = kv_cache.shape
    dim = two_d // 2
    kv = kv_cache.view(num_blocks, heads, 2 * block_size, dim)
    value_cache = kv[:, :, block_size:]
    key_cache = torch.as_strided(
        kv, (num_blocks, heads, block_size, dim), (kv.stride(0), kv.stride(1), 1, block_size),
        kv.storage_offset(),
    )
    return key_cache, value_cache


@dataclass
class AdaKVCPUMetadata(CPUAttentionMetadata):
    """CPU metadata for the dense kernel, plus this step's compression plan."""

    step: StepPlan | None = None
    layer_names: list[str] | None = None  # the compressed layers of this group
    store: CompressionStore | None = None  # this worker's compression state


class AdaKVCPUMetadataBuilder(CompressedBuilder, CPUAttentionMetadataBuilder):
    platform = "cpu"  # the model's dtype only: fp8 caches are refused (config.py)

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if self.init_compression(layer_names, vllm_config) and self.isa not in SUPPORTED_ISAS:
            logical_kv_views(torch.empty(1, 1, 32, 2), self.isa)  # raises the clear error

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> CPUAttentionMetadata:
        if not self.compressed:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        cm = common_attn_metadata
        step = self.begin_step(cm)
        decode_rows = step.decode_rows
        if decode_rows:
            # Released blocks must not be read by the dense kernel: let it see only
            # the query tokens themselves (its output for these rows is replaced).
            clamped = cm.seq_lens.clone()
            for r in decode_rows:
                clamped[r.row] = r.query_len
            cm = replace(cm, seq_lens=clamped, max_seq_len=int(clamped.max().item()))
        dense = super().build(common_prefix_len, cm, fast_build)
        base = {f.name: getattr(dense, f.name) for f in fields(CPUAttentionMetadata)}
        return AdaKVCPUMetadata(**base, step=step, layer_names=self.layer_names,
                                store=self.store)


class AdaKVCPUImpl(CompressedImpl, CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                        output_scale, output_block_scale)
        if not isinstance(attn_metadata, AdaKVCPUMetadata) or attn_metadata.step is None:
            return output
        step = attn_metadata.step
        if step.is_empty():
            return output
        store = attn_metadata.store
        layer_name = layer.layer_name
        layer_idx = extract_layer_index(layer_name)
        cache = self.layer_cache(kv_cache, layer, attn_metadata.layer_names,
                                 lambda t: logical_kv_views(t, layer.isa))
        qsl = attn_metadata.query_start_loc.tolist()
        block_table = attn_metadata.block_table
        headwise_rows = [(row, 0) for row in step.rows if row.compressed_before]
        _, completing = self.compress_prefills(
            store, [r for r in step.rows if not r.compressed_before], layer_name, layer_idx,
            query, output, cache, block_table, qsl)
        # Own-tensor pages are compacted already: the head-wise path serves the rest
        # (reading them where they went: the compaction targets, if any).
        resumed = [row for row in completing if row.resumed and not row.plan.pooled]
        headwise_rows += [(row, row.prompt_len - row.context_start) for row in resumed]
        if headwise_rows:
            # Split at decode events (--kv-decode-budget), which run in between.
            table = with_targets(block_table, resumed)
            q3 = query.view(query.shape[0], self.num_heads, self.head_size)
            events = DecodeEvents(store, layer_name, layer_idx, cache.key, cache.value, table,
                                  self.scale, cache.k_scale)
            events.serve(headwise_rows, q3, qsl, lambda segments: self._headwise(
                store, layer_name, segments, query, cache, table, qsl, output))
        return output

    def _headwise(self, store: CompressionStore, layer_name, segments: list[Segment], query,
                  cache: LayerCache, block_table, qsl, output) -> None:
        """Attention over kept pages + tail for the segments' queries (positions
        ``[start, end)`` of their rows): the CUDA backend's range contract, slot i = segment
        i."""
        heads = cache.key.shape[1]
        starts, counts, chunk_base, capacity, tails = [], [], [], [], []
        for seg in segments:
            p = store.pages_of(seg.row.req_id, layer_name)
            state = store.requests[seg.row.req_id]
            starts.append(p.page_start)
            counts.append(p.counts)
            chunk_base.append(state.chunk_base)
            capacity.append(capacity_of(p, state, heads))
            tails.append(p.tail_start)
        first = [qsl[s.row.row] + s.start - s.row.context_start for s in segments]
        table = row_table(
            torch.tensor([s.row.row for s in segments]), torch.arange(len(segments)),
            torch.tensor(first),
            torch.tensor([f + s.end - s.start for f, s in zip(first, segments, strict=True)]),
            torch.tensor(tails), torch.tensor([s.end for s in segments]))
        q3 = query.view(query.shape[0], self.num_heads, self.head_size)
        kernels.headwise_attention_ranges_reference(
            q3, cache.all_key, cache.all_value, torch.stack(starts), torch.stack(counts),
            block_table, table, 0, self.scale,
            output.view(output.shape[0], self.num_heads, self.head_size),
            chunk_base=torch.stack(chunk_base), capacity=torch.tensor(capacity),
            layer_base=cache.base, k_scale=cache.k_scale, v_scale=cache.v_scale)


class AdaKVCPUBackend(CPUAttentionBackend):
    """Registered in place of CPU_ATTN (the CPU platform always asks for that member)."""

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        return compressible_spec(super().customize_spec(spec))

    @staticmethod
    def get_impl_cls() -> type[AdaKVCPUImpl]:
        return AdaKVCPUImpl

    @staticmethod
    def get_builder_cls() -> type[AdaKVCPUMetadataBuilder]:
        return AdaKVCPUMetadataBuilder


__all__ = ["AdaKVCPUBackend"]
