"""One view over every layer's KV blocks, so a kernel can reach any layer's head-pages.

vLLM 0.32 allocates the KV cache of a group as one buffer and hands each layer a
strided view of it (``vllm/v1/kv_cache_interface.py: create_kv_cache_views``): layer
``l``'s block ``b`` at ``offset + l * layer_stride + b * block_stride``. When the layer
offsets are whole blocks (layer-outermost layouts, ours on CPU and CUDA), the buffer
read as ``[total_blocks, ...]`` with the layer view's strides holds layer ``l`` at
block offset ``layer_base(l)``: pooled head-pages then name a block of that view.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_adakv.tensors import on_device


@dataclass(frozen=True)
class GroupBlocks:
    """Where a group's compressed layers lie in their shared buffer."""

    merged: torch.Tensor  # the buffer over all its blocks, with a layer view's strides
    base_of: dict[str, int]  # first block of each layer (by name)
    bases: torch.Tensor  # [K] int32 the same in ascending layer index, on the cache's device


class LayerViews:
    """All-layers views of the KV buffers seen by this worker, by buffer (one per worker
    context)."""

    def __init__(self) -> None:
        self._views: dict[tuple, torch.Tensor] = {}
        # (data_ptr of the calling layer's cache, layer names) -> its group's blocks
        self._groups: dict[tuple, GroupBlocks] = {}

    def locate(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(view over all blocks of ``kv_cache``'s buffer with its strides, block offset of
        ``kv_cache`` in it). Raises if ``kv_cache`` does not start at a whole block."""
        block_stride = kv_cache.stride(0)
        offset = kv_cache.storage_offset()
        if offset % block_stride:
            raise RuntimeError(
                "vllm-adakv: this layer's KV cache does not start at a whole block of its "
                f"buffer (offset {offset} elements, block stride {block_stride}); pooling "
                "head-pages across layers needs a layer-outermost KV cache layout")
        storage = kv_cache.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes(), kv_cache.stride(),
               tuple(kv_cache.shape[1:]), kv_cache.dtype)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= 8:  # buffers of engines gone from this process
                self._views.clear()
            num_blocks = storage.nbytes() // kv_cache.element_size() // block_stride
            view = torch.as_strided(kv_cache, (num_blocks, *kv_cache.shape[1:]),
                                    kv_cache.stride(), 0)
            self._views[key] = view
        return view, offset // block_stride

    def group_blocks(self, kv_cache: torch.Tensor, layer_names: list[str]) -> GroupBlocks:
        """The blocks of the layers ``layer_names`` for the layer whose cache is ``kv_cache``,
        reading the other layers' caches from vLLM's forward context (the layers bound at KV
        cache allocation). Computed once per buffer and group."""
        key = (kv_cache.data_ptr(), tuple(layer_names))
        found = self._groups.get(key)
        if found is not None:
            return found
        from vllm.forward_context import get_forward_context
        from vllm.model_executor.models.utils import extract_layer_index

        layers = get_forward_context().no_compile_layers
        merged, _ = self.locate(kv_cache)
        base_of = {}
        for name in layer_names:
            view, base = self.locate(layers[name].kv_cache)
            if view is not merged:
                raise RuntimeError(
                    f"vllm-adakv: layer {name}'s KV cache is not in the same buffer (with the "
                    "same strides) as the other compressed layers'; pooling head-pages across "
                    "layers needs one buffer")
            base_of[name] = base
        ordered = [base_of[n] for n in sorted(layer_names, key=extract_layer_index)]
        if len(self._groups) >= 64:
            self._groups.clear()
        found = GroupBlocks(merged, base_of, on_device(ordered, torch.int32, kv_cache.device))
        self._groups[key] = found
        return found
