"""Worker side of the compaction targets (prefix caching on).

With prefix caching a compressed request's prompt blocks may be shared or hashed, so
the scheduler gives it fresh blocks, its *targets*, in the step whose chunk ends its
prompt (``scheduler/manager.py``; ``protocol.targets_of``). In that step the request is
compacted into them while its block-table row still holds the prompt blocks that
scoring and the dense attention read. From the next step on the row must hold the
targets in ``[0, m)``, as the scheduler's block list does after its release: the
head-wise kernels read a request's pages through its row. vLLM's worker rows are
append-only for running requests, so the targets are written into them here, after
vLLM's ``_update_states`` and before the row is copied to the device
(``patches.patch_model_runner``).
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_adakv.protocol import targets_of
from vllm_adakv.tensors import on_device


class CompactionTargets:
    """The targets of one worker: this step's, and the previous step's to place."""

    def __init__(self) -> None:
        self.step: dict[int, dict[str, list[int]]] = {}  # group id -> request -> block ids
        self._to_place: dict[int, dict[str, list[int]]] = {}

    def update(self, runner: Any, scheduler_output: Any) -> None:
        """After vLLM's ``_update_states``: the previous step's targets into the request
        states and block-table rows (that step compacted into them); this step's taken.
        A request resumed after a preemption has new blocks and is compressed anew."""
        if self._to_place:
            resumed = scheduler_output.scheduled_cached_reqs.resumed_req_ids
            new = {r.req_id for r in scheduler_output.scheduled_new_reqs}
            batch = runner.input_batch
            for group, by_request in self._to_place.items():
                rows = batch.block_table[group].block_table.np
                for req_id, ids in by_request.items():
                    state = runner.requests.get(req_id)
                    if state is None or req_id in resumed or req_id in new:
                        continue
                    state.block_ids[group][: len(ids)] = ids
                    index = batch.req_id_to_index.get(req_id)
                    if index is not None:
                        rows[index, : len(ids)] = ids
        self.step = targets_of(scheduler_output)
        self._to_place = self.step


def group_of(runner: Any, layer_name: str) -> int:
    """The KV cache group id of ``layer_name`` in ``runner``'s KV cache config."""
    for group, spec in enumerate(runner.kv_cache_config.kv_cache_groups):
        if layer_name in spec.layer_names:
            return group
    raise RuntimeError(f"vllm-adakv: layer {layer_name} is in no KV cache group")


def with_targets(block_table: torch.Tensor, rows: list[Any]) -> torch.Tensor:
    """``block_table`` with the targets of ``rows`` (``RowPlan``) in place of their first
    blocks: what the head-wise kernel reads for a row compacted in this step whose later
    tokens it serves in the same step (a request recomputed after a preemption). A copy;
    the table itself stays as the dense attention and the compaction read it."""
    rows = [r for r in rows if r.targets is not None]
    if not rows:
        return block_table
    table = block_table.clone()
    for row in rows:
        table[row.row, : len(row.targets)] = on_device(row.targets, table.dtype, table.device)
    return table
