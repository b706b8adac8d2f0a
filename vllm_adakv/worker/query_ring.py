"""Device ring of the last generated queries, by slot, for decode events on CUDA.

A decode event at ``S`` scores its candidates with the queries of ``[S - w, S)``
(``worker/decode_events.py``), which earlier steps computed. On CUDA decode steps replay
a full CUDA graph, so the impl's Python does not run there: each layer's forward writes
its rows' queries into this ring inside the graph (``index_copy_`` at a persistent
index the builder rewrites every step), at ``slot * W + position % W``. Rows without
decode compression, and the rows a graph pads the batch with, write into a spare slot.
Eager steps write the same ring through ``ring.view`` (``DecodeEvents._keep_queries``).

Size: ``layers x (slots + 1) x W x Hq x D`` elements of the model's dtype
(:meth:`QueryRing.nbytes`), allocated when the engine builds its attention metadata,
after vLLM sized the KV cache (e.g. 64 slots of Llama-3.1-8B with ``W = 32``: 32 x 65 x
32 x 32 x 128 x 2 B = 545 MiB; 256 slots: 2.1 GB). vLLM's memory profile counts it all
the same: ``patches`` holds its bytes through ``profile_run``
(``WorkerContext.late_device_bytes``).
"""

from __future__ import annotations

import torch


class QueryRing:
    """``[K, (slots + 1) * W, Hq, D]``: the last ``W`` queries of each slot, per layer."""

    def __init__(self, num_layers: int, num_slots: int, window: int, num_q_heads: int,
                 head_size: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.window = window
        self.num_slots = num_slots
        self.buffer = torch.zeros(num_layers, (num_slots + 1) * window, num_q_heads,
                                  head_size, dtype=dtype, device=device)
        self.spare = num_slots * window  # index written by rows without a ring

    @staticmethod
    def nbytes(num_layers: int, num_slots: int, window: int, num_q_heads: int,
               head_size: int, dtype: torch.dtype) -> int:
        """Bytes of the buffer of ``QueryRing(num_layers, num_slots, window, ...)``."""
        return (num_layers * (num_slots + 1) * window * num_q_heads * head_size
                * dtype.itemsize)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.buffer.shape)

    def view(self, layer: int, slot: int) -> torch.Tensor:
        """``[W, Hq, D]``: the ring of ``slot`` in compressed layer ``layer`` (chunk index)."""
        start = slot * self.window
        return self.buffer[layer, start : start + self.window]

    def index(self, slot: int, position: int) -> int:
        """Flat index of the query of ``position`` of the request in ``slot``."""
        return slot * self.window + position % self.window

    def write(self, layer: int, index: torch.Tensor, query: torch.Tensor) -> None:
        """Each row's query ``[n, Hq, D]`` at its flat ``index`` ``[n]`` (graph-safe)."""
        self.buffer[layer].index_copy_(0, index, query)
