"""One view over every layer's KV blocks, so a kernel can reach any layer's head-pages.

vLLM 0.32 allocates the KV cache of a group as one buffer and hands each layer a
strided view of it (``vllm/v1/kv_cache_interface.py: create_kv_cache_views``): layer
``l``'s block ``b`` at ``offset + l * layer_stride + b * block_stride``. When the layer
offsets are whole blocks (layer-outermost layouts, ours on CPU and CUDA), the buffer
read as ``[total_blocks, ...]`` with the layer view's strides holds layer ``l`` at
block offset ``layer_base(l)``: pooled head-pages then name a block of that view.
"""

from __future__ import annotations

import torch


class LayerViews:
    """All-layers views of the KV buffers seen by this worker, by buffer."""

    def __init__(self) -> None:
        self._views: dict[tuple, torch.Tensor] = {}

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


_VIEWS = LayerViews()
# (data_ptr of the calling layer's cache, layer names) -> (all-layers view, bases)
_GROUP: dict[tuple, tuple[torch.Tensor, dict[str, int]]] = {}


def group_blocks(kv_cache: torch.Tensor, layer_names: list[str]
                 ) -> tuple[torch.Tensor, dict[str, int]]:
    """(view over all blocks of the buffer, first block of each named layer in it), for the
    layer whose cache is ``kv_cache``, reading the other layers' caches from vLLM's
    forward context (the layers bound at KV cache allocation)."""
    key = (kv_cache.data_ptr(), tuple(layer_names))
    found = _GROUP.get(key)
    if found is not None:
        return found
    from vllm.forward_context import get_forward_context

    layers = get_forward_context().no_compile_layers
    merged, _ = _VIEWS.locate(kv_cache)
    bases = {}
    for name in layer_names:
        view, base = _VIEWS.locate(layers[name].kv_cache)
        if view is not merged:
            raise RuntimeError(
                f"vllm-adakv: layer {name}'s KV cache is not in the same buffer (with the "
                "same strides) as the other compressed layers'; pooling head-pages across "
                "layers needs one buffer")
        bases[name] = base
    if len(_GROUP) >= 64:
        _GROUP.clear()
    _GROUP[key] = (merged, bases)
    return merged, bases
