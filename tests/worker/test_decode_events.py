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


def seg_budgets(due) -> tuple[int, ...]:
    """The one decode budget the rows of ``_event_layout`` share."""
    (budgets,) = {seg.row.decode.layer_budgets for seg in due}
    return budgets


def _event_layout(method: str, seed: int):
    """A store with two requests whose layer 0 holds prompt pages and a generated tail, a
    random paged cache and block table, and the rows of their event at ``S``."""
    import torch

    from vllm_adakv.worker.compressor import CompressionStore, RequestKV
    from vllm_adakv.worker.decode_events import Segment

    gen = torch.Generator().manual_seed(seed)
    heads, q_heads, dim, bs, w = 2, 4, 32, 16, 8
    cfg = KVCompressionConfig(method=method, budget=64, window=w, decode_budget=48,
                              decode_interval=10)
    store = CompressionStore(cfg, (0,))
    key = torch.randn(96, heads, bs, dim, generator=gen)
    value = torch.randn(96, heads, bs, dim, generator=gen)
    table = torch.stack([torch.randperm(95, generator=gen)[:40] + 1 for _ in range(2)])
    due = []
    for r, length in enumerate((300, 333)):
        plan = plan_compression(cfg, length, heads, bs, 1)
        decode = plan_decode(cfg, length, heads, bs, 1, interval=10, budget=48)
        seq = length + decode.first_event + 10 * r  # a first and a second-round event
        row = RowPlan(row=r, req_id=f"r{r}", prompt_len=length, context_start=seq,
                      query_len=1, plan=plan, decode=decode)
        state = store.requests[row.req_id] = RequestKV(prompt_len=length)
        if method == "adakv":  # uneven heads within the layer's total
            counts = torch.tensor([90, 38]) if r == 0 else torch.tensor([20, 108])
        else:
            counts = torch.tensor([64, 64])
        pages = -(-counts // bs)
        assert int(pages.sum()) <= plan.kept_blocks * heads
        bound = 8 + heads * 56 if method == "adakv" else 64
        state.pages["l0"] = LayerPages(
            page_start=(torch.cumsum(pages, 0) - pages).int(), counts=counts.int(),
            capacity=decode.page_blocks * heads, tail_start=length, count_bound=bound)
        state.positions["l0"] = torch.stack([
            torch.sort(torch.randperm(length, generator=gen)[:90]).values[:n]
            if n else torch.zeros(0, dtype=torch.long) for n in counts.tolist()
        ] if method != "adakv" else [
            torch.nn.functional.pad(torch.sort(torch.randperm(length, generator=gen)[
                :int(n)]).values, (0, 108 - int(n))) for n in counts])
        state.recent_queries["l0"] = torch.randn(w, q_heads, dim, generator=gen)
        due.append(Segment(row, seq, seq, True))
    return store, key, value, table, due


@pytest.mark.parametrize("method", ["adakv", "snapkv", "streamingllm"])
def test_in_place_event_equals_the_dense_event(method):
    """The CUDA backend's event (scores read in place, candidates sized by host bounds,
    ``Method.select_candidates``) keeps what the dense, checked event keeps
    (``Method.reselect`` over gathered candidates), writes the same pages and reports
    them to the device tables: both run here on the torch references, on fresh random
    layouts with uneven Ada-KV heads, a first event and a later one."""
    import copy

    import torch

    from vllm_adakv.worker.decode_events import DecodeEvents
    from vllm_adakv.worker.query_ring import QueryRing

    results = []
    for in_place, in_ring in ((False, False), (True, False), (True, True)):
        store, key, value, table, due = _event_layout(method, seed=7)
        store, key, value = copy.deepcopy(store), key.clone(), value.clone()
        hooked = []
        ring = slot_of = None
        if in_ring:  # the window queries gathered from the CUDA backend's ring, slots 1, 0
            first = store.requests["r0"].recent_queries["l0"]
            ring = QueryRing(1, 2, first.shape[0], *first.shape[1:], first.dtype, "cpu")
            ring.buffer.normal_()  # (what is not a window query must not be read)
            slots = {"r0": 1, "r1": 0}
            for req_id, slot in slots.items():
                ring.view(0, slot).copy_(store.requests[req_id].recent_queries.pop("l0"))
            slot_of = slots.__getitem__
        events = DecodeEvents(store, "l0", 0, key, value, table, 0.2,
                              on_event=lambda *a, out=hooked: out.append(a),
                              in_place=in_place, ring=ring, slot_of=slot_of)
        events.run(due)
        pages = [store.requests[f"r{r}"].pages["l0"] for r in range(2)]
        results.append((pages, key, value, hooked))
    (dense, dk, dv, dh), (inplace, ik, iv, ih), (ringed, rk, rv, rh) = results
    for a, b in zip(inplace, ringed, strict=True):
        assert torch.equal(a.counts, b.counts) and torch.equal(a.page_start, b.page_start)
    assert torch.equal(ik, rk) and torch.equal(iv, rv) and len(rh) == 1
    for a, b in zip(dense, inplace, strict=True):
        assert torch.equal(a.counts, b.counts) and torch.equal(a.page_start, b.page_start)
        assert (a.tail_start, a.last_event, a.capacity) == (b.tail_start, b.last_event,
                                                            b.capacity)
        assert b.count_bound >= int(b.counts.max())
        # The next event's widths: the counts' host copy tightens the bound.
        assert b.known_bound() == int(b.counts.max()) and b.counts_host is None
    assert int(dense[0].counts.sum()) == 2 * 40  # the decode budget's selection, per layer
    assert torch.equal(dk, ik) and torch.equal(dv, iv)
    (rows, layers, starts, counts), = ih
    assert layers == [0, 0] and [r.req_id for r in rows] == ["r0", "r1"]
    assert torch.equal(starts, torch.stack([p.page_start for p in inplace]))
    assert torch.equal(counts, torch.stack([p.counts for p in inplace]))


@pytest.mark.parametrize("method,one_per_set", [("adakv", False), ("snapkv", False),
                                                ("adakv", True), ("pyramidkv", False)])
def test_events_across_layers_equal_each_layers_events(method, one_per_set, monkeypatch):
    """``DecodeEvents.across_layers`` (the CUDA backend's decode-only steps: every layer in
    one launch set, through the view over all layers' blocks and block tables offset by
    each layer's first block; or in several sets when their compaction scratch would pass
    ``EVENT_SCRATCH_BYTES``) leaves the same pages and caches as one event per layer on
    that layer's own views, and reports every (layer, row). PyramidKV: each layer keeps
    its own budget of the schedule."""
    import copy
    import dataclasses

    import torch

    from vllm_adakv.worker import decode_events
    from vllm_adakv.worker.decode_events import DecodeEvents, EventLayer
    from vllm_adakv.worker.query_ring import QueryRing

    if one_per_set:
        monkeypatch.setattr(decode_events, "EVENT_SCRATCH_BYTES", 1)

    layers = []
    for seed in (3, 4):  # each layer's own random cache and pages; the same requests
        layers.append(_event_layout(method, seed))
    store, _, _, table, due = layers[0]
    store.layer_indices = (0, 1)
    # Both layers get the same decode budget; PyramidKV's schedule gives them their own.
    budgets = (56, 40) if method == "pyramidkv" else seg_budgets(due) * 2
    for seg in due:
        seg.row.decode = dataclasses.replace(seg.row.decode, layer_budgets=budgets)
    capacity = store.requests["r0"].pages["l0"].capacity
    for req_id, state in store.requests.items():
        other = layers[1][0].requests[req_id].pages["l0"]
        cap = capacity if req_id == "r0" else state.pages["l0"].capacity
        state.pages["l1"] = LayerPages(  # layer 1's pages: chunk 1 of the page sequence
            page_start=other.page_start + cap, counts=other.counts, capacity=cap,
            tail_start=other.tail_start, count_bound=other.count_bound)
    nb = layers[0][1].shape[0]
    all_key = torch.cat([layers[0][1], layers[1][1]])
    all_value = torch.cat([layers[0][2], layers[1][2]])
    first = store.requests["r0"].recent_queries["l0"]
    ring = QueryRing(2, 2, first.shape[0], *first.shape[1:], first.dtype, "cpu")
    ring.buffer.normal_()
    slots = {"r0": 1, "r1": 0}
    for req_id, slot in slots.items():
        for k in range(2):
            ring.view(k, slot).copy_(layers[k][0].requests[req_id].recent_queries["l0"])
    results = []
    for across in (False, True):
        s, k_all, v_all = copy.deepcopy(store), all_key.clone(), all_value.clone()
        hooked = []
        hook = lambda *a, out=hooked: out.append(a)  # noqa: E731
        if across:
            DecodeEvents.across_layers(
                s, [EventLayer("l0", 0, 0), EventLayer("l1", 1, nb)], k_all, v_all, table,
                0.2, ring, slots.__getitem__, on_event=hook, in_place=True).run(due)
        else:
            for k, name in enumerate(("l0", "l1")):
                DecodeEvents(s, name, k, k_all[k * nb:(k + 1) * nb],
                             v_all[k * nb:(k + 1) * nb], table, 0.2, on_event=hook,
                             in_place=True, ring=ring, slot_of=slots.__getitem__).run(due)
        results.append((s, k_all, v_all, hooked))
    (one, k1, v1, h1), (both, k2, v2, h2) = results
    assert torch.equal(k1, k2) and torch.equal(v1, v2)
    for req_id in ("r0", "r1"):
        for name in ("l0", "l1"):
            a, b = one.requests[req_id].pages[name], both.requests[req_id].pages[name]
            assert torch.equal(a.counts, b.counts) and torch.equal(a.page_start, b.page_start)
            assert (a.tail_start, a.last_event, a.count_bound) == (b.tail_start,
                                                                   b.last_event, b.count_bound)
    assert not torch.equal(k1, all_key)  # the events moved pages
    for req_id in ("r0", "r1"):  # each layer keeps its budget's selection (enough candidates)
        for name, budget in zip(("l0", "l1"), budgets, strict=True):
            assert int(both.requests[req_id].pages[name].counts.sum()) == 2 * (budget - 8)
    assert len(h2) == (2 if one_per_set else 1)
    assert [layer for h in h2 for layer in h[1]] == [0, 0, 1, 1]
    assert [r.req_id for h in h2 for r in h[0]] == ["r0", "r1"] * 2
    assert torch.equal(torch.cat([h[2] for h in h2]), torch.cat([h[2] for h in h1]))
    assert torch.equal(torch.cat([h[3] for h in h2]), torch.cat([h[3] for h in h1]))
