"""Where a layer's decode events split a row's query tokens (worker/decode_events.py)."""

from __future__ import annotations

import pytest

from vllm_adakv.config import KVCompressionConfig
from vllm_adakv.decode_plan import plan_decode
from vllm_adakv.memory import plan_compression
from vllm_adakv.worker.batch import RowPlan
from vllm_adakv.worker.compressor import LayerPages
from vllm_adakv.worker.decode_events import event_points, segments

CFG = KVCompressionConfig(method="snapkv", budget=64, window=8, decode_budget=48,
                          decode_interval=10)
L = 300


def _row(context_start: int, query_len: int) -> RowPlan:
    plan = plan_compression(CFG, L, 2, 16, 2)
    decode = plan_decode(CFG, L, 2, 16, 2, interval=10, budget=48)
    return RowPlan(row=0, req_id="r", prompt_len=L, context_start=context_start,
                   query_len=query_len, plan=plan, decode=decode)


def _pages(last_event: int = -1) -> LayerPages:
    return LayerPages(page_start=None, counts=None, tail_start=L, last_event=last_event)


def test_events_follow_the_plan():
    row = _row(0, L + 200)
    plan = row.decode
    assert plan.first_event == 10  # the window (8) rounded up to the interval
    points = event_points(row, -1, L, L + 200)
    assert points == [L + n for n in range(10, 201, 10)]
    assert [p - L for p in points] == [n for n in range(1, 201) if plan.last_event(n) == n]
    assert event_points(row, 50, L, L + 200)[0] == L + 60  # after the layer's last event


@pytest.mark.parametrize("context_start,query_len,last,want", [
    (L + 8, 1, -1, [(L + 8, L + 9, False)]),  # a decode step before the first event
    (L + 9, 1, -1, [(L + 9, L + 10, True)]),  # a decode step that reaches S = L + 10
    (L + 10, 1, 10, [(L + 10, L + 11, False)]),
    # a recomputation: prompt completes and the chunk passes two event points
    (0, L + 25, -1, [(L, L + 10, True), (L + 10, L + 20, True), (L + 20, L + 25, False)]),
    (0, L + 20, -1, [(L, L + 10, True), (L + 10, L + 20, True)]),
])
def test_segments_split_at_event_points(context_start, query_len, last, want):
    row = _row(context_start, query_len)
    start = max(context_start, L)
    got = [(s.start, s.end, s.event) for s in segments(row, _pages(last), start)]
    assert got == want


def test_rows_without_decode_plan_are_one_segment():
    row = _row(L + 40, 1)
    row.decode = None
    assert [(s.start, s.end, s.event) for s in segments(row, _pages(), L + 40)] == [
        (L + 40, L + 41, False)]
