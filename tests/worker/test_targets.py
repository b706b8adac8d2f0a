"""The head-wise block table of a step in which a resumed row is compacted into targets."""

from __future__ import annotations

import torch

from vllm_adakv.config import KVCompressionConfig
from vllm_adakv.memory import plan_compression
from vllm_adakv.worker.batch import RowPlan
from vllm_adakv.worker.targets import with_targets


def _row(row: int, targets: list[int] | None) -> RowPlan:
    plan = plan_compression(KVCompressionConfig(method="snapkv", budget=64, window=8), 500,
                            2, 32, 2)
    return RowPlan(row=row, req_id=f"r{row}", prompt_len=500, context_start=448,
                   query_len=60, plan=plan, targets=targets)


def test_rows_with_targets_read_them_in_a_copy():
    table = torch.arange(40, dtype=torch.int32).view(4, 10)
    before = table.clone()
    out = with_targets(table, [_row(1, [90, 91, 92]), _row(3, None)])
    assert torch.equal(table, before)  # the dense attention and compaction read this one
    want = before.clone()
    want[1, :3] = torch.tensor([90, 91, 92], dtype=torch.int32)
    assert torch.equal(out, want)


def test_no_targets_no_copy():
    table = torch.zeros(2, 4, dtype=torch.int32)
    assert with_targets(table, [_row(0, None)]) is table
