"""Device tables of each compressed request's head-page ranges, by slot.

After compaction, head h of layer l of a request owns the entries
``page_start .. page_start + ceil(kept / bs) - 1`` of the request's pooled head-page
sequence: entry g lies in chunk ``g // capacity``, i.e. in the layer tensor starting at
block ``chunk_base[chunk]`` of the all-layers view, at block
``block_table[(g % capacity) // H]``, slot ``g % H``. The decode kernel reads
``page_start`` and ``kept`` from two ``[slots, layers, H]`` int32 tables, ``chunk_base``
from ``[slots, K]`` and ``capacity`` from ``[slots]``; they live on the device for the
whole run, so a step only uploads one small per-row table (batch row -> slot).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vllm_adakv.tensors import on_device

if TYPE_CHECKING:
    from vllm_adakv.worker.batch import RowPlan
    from vllm_adakv.worker.compressor import CompactedRow


class RangePool:
    """Slots for the requests of this worker, and their per-layer page ranges."""

    def __init__(self, num_slots: int, num_layers: int, num_kv_heads: int,
                 device: torch.device | str, num_chunks: int | None = None) -> None:
        shape = (num_slots, num_layers, num_kv_heads)
        self.page_start = torch.zeros(shape, dtype=torch.int32, device=device)
        self.kept_counts = torch.zeros(shape, dtype=torch.int32, device=device)
        chunks = num_layers if num_chunks is None else num_chunks
        self.chunk_base = torch.zeros(num_slots, chunks, dtype=torch.int32, device=device)
        self.capacity = torch.ones(num_slots, dtype=torch.int32, device=device)
        self._slot_of: dict[str, int] = {}
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.page_start.shape)  # type: ignore[return-value]

    def retain(self, live_req_ids: frozenset[str]) -> None:
        """Free the slots of requests that are gone from the worker."""
        for req_id in [r for r in self._slot_of if r not in live_req_ids]:
            self._free.append(self._slot_of.pop(req_id))

    def slot(self, req_id: str) -> int:
        """The request's slot, assigned on first use."""
        slot = self._slot_of.get(req_id)
        if slot is None:
            if not self._free:
                raise RuntimeError(
                    f"vllm-adakv: no free page-range slot for request {req_id!r} "
                    f"({self.shape[0]} slots, one per running request)"
                )
            slot = self._free.pop()
            self._slot_of[req_id] = slot
        return slot

    def store_rows(self, req_ids: list[str], layers: list[int], page_starts: torch.Tensor,
                   kept_counts: torch.Tensor, chunk_base: torch.Tensor,
                   capacity: torch.Tensor) -> None:
        """Page ranges of ``layers`` (model indices) for several requests: page_starts and
        kept_counts ``[R, len(layers), H]``, chunk_base ``[R, K]``, capacity ``[R]``."""
        dev = self.page_start.device
        slots = on_device([self.slot(r) for r in req_ids], torch.long, dev)
        cols = on_device(layers, torch.long, dev)
        index = (slots[:, None], cols[None, :])
        self.page_start[index] = page_starts.to(dev, torch.int32)
        self.kept_counts[index] = kept_counts.to(dev, torch.int32)
        self.chunk_base[slots] = chunk_base.to(dev, torch.int32)
        self.capacity[slots] = capacity.to(dev, torch.int32)

    def store_events(self, rows: list[RowPlan], layers: list[int], page_starts: torch.Tensor,
                     kept_counts: torch.Tensor) -> None:
        """Page ranges ``[E, H]`` after decode events, one per (row, layer) pair of ``rows``
        and ``layers`` (model indices); their chunk tables and capacity stay
        (``worker/decode_events.py``)."""
        dev = self.page_start.device
        index = on_device([[self.slot(r.req_id) for r in rows], layers], torch.long, dev)
        self.page_start[index[0], index[1]] = page_starts.to(dev, torch.int32)
        self.kept_counts[index[0], index[1]] = kept_counts.to(dev, torch.int32)

    def store_compacted(self, done: list[CompactedRow]) -> None:
        """The page ranges of a step's compacted rows, one ``store_rows`` per set of layers
        (all rows of a layer-by-layer step share theirs)."""
        by_layers: dict[tuple[int, ...], list[CompactedRow]] = {}
        for entry in done:
            by_layers.setdefault(tuple(entry.layers), []).append(entry)
        for layers, entries in by_layers.items():
            self.store_rows([e.row.req_id for e in entries], list(layers),
                            torch.stack([e.page_start for e in entries]),
                            torch.stack([e.counts for e in entries]),
                            torch.stack([e.chunk_base for e in entries]),
                            torch.stack([e.capacity for e in entries]))
