"""Decode-time re-selection (``Method.reselect``): direct float64 definitions, invariants,
a multi-event simulation against dense attention, and input errors."""

from __future__ import annotations

import math

import pytest
import torch

from tests.methods.conftest import Rng
from vllm_adakv.config import KVCompressionConfig
from vllm_adakv.decode_plan import plan_decode
from vllm_adakv.kernels.decode import headwise_attention_ranges_reference, row_table
from vllm_adakv.memory import cdiv, max_head_pages
from vllm_adakv.methods import get_method
from vllm_adakv.methods.adakv import adakv_counts_heads, adakv_counts_rows
from vllm_adakv.methods.base import DecodeRows, LayerRows
from vllm_adakv.methods.gvote import gvote_voters

METHODS = ("snapkv", "adakv", "pyramidkv", "streamingllm", "gvote")
F64 = torch.float64


def _cfg(method: str, budget: int, window: int, **kw) -> KVCompressionConfig:
    return KVCompressionConfig(method=method, budget=budget, window=window, **kw)


def _event(rng: Rng, cfg, counts: list[list[int]], budgets: list[int], *, group: int = 4,
           dim: int = 8, layer_idx: int = 0) -> DecodeRows:
    """Random event: row r, head h has ``counts[r][h]`` candidates at sorted random
    positions below its window."""
    rows, heads, window = len(counts), len(counts[0]), cfg.window
    width = max(max(c) for c in counts)
    seq_lens = [max(c) + window + rng.randint(0, 20) for c in counts]
    positions = torch.zeros(rows, heads, width, dtype=torch.long)
    for r, row in enumerate(counts):
        for h, n in enumerate(row):
            pick = torch.randperm(seq_lens[r] - window, generator=rng.gen)[:n]
            positions[r, h, :n] = pick.sort().values
    return DecodeRows(
        cfg=cfg, layer_idx=layer_idx, budgets=budgets,
        keys=rng.randn(rows, heads, width, dim).double(),
        num_candidates=torch.tensor(counts), positions=positions,
        window_keys=rng.randn(rows, heads, window, dim).double(),
        window_queries=(rng.randn(rows, window, heads * group, dim) * 1.5).double(),
        seq_lens=seq_lens, scale=dim ** -0.5)


# --------------------------------------------------------------------------- direct defs


def _softmax(x: list[float]) -> list[float]:
    top = max(x)
    e = [math.exp(v - top) for v in x]
    total = sum(e)
    return [v / total for v in e]


def _window_scores(ev: DecodeRows, r: int, h: int) -> list[float]:
    """Window attention on head h's candidates, summed, GQA-reduced, pooled (loops)."""
    cfg, n = ev.cfg, int(ev.num_candidates[r, h])
    w, hq = ev.window_queries.shape[1], ev.window_queries.shape[2]
    group = hq // ev.num_heads
    per_head = []
    for g in range(group):
        acc = [0.0] * n
        for i in range(w):
            q = ev.window_queries[r, i, h * group + g]
            logits = [float(q @ ev.keys[r, h, c]) * ev.scale for c in range(n)]
            logits += [float(q @ ev.window_keys[r, h, j]) * ev.scale for j in range(i + 1)]
            p = _softmax(logits)
            for c in range(n):
                acc[c] += p[c]
        per_head.append(acc)
    red = max if cfg.gqa_reduce == "max" else (lambda v: sum(v) / len(v))
    s = [red([per_head[g][c] for g in range(group)]) for c in range(n)]
    k = cfg.pool_kernel // 2
    out = []
    for c in range(n):
        near = s[max(0, c - k): c + k + 1]
        out.append(max(near) if cfg.pooling == "max" else sum(near) / len(near))
    return out


def _top(scores: list[float], count: int) -> set[int]:
    return set(sorted(range(len(scores)), key=lambda c: (-scores[c], c))[:count])


def _spread(amount: int, room: list[int], order: list[int]) -> list[int]:
    out = [0] * len(room)
    for h in order:
        if amount > 0 and room[h] > 0:
            out[h] += 1
            amount -= 1
    for h in order:
        g = min(room[h] - out[h], amount)
        out[h] += g
        amount -= g
    return out


def _adakv_caps(scores: list[list[float]], sel: int, alpha: float) -> list[int]:
    """Ada-KV over heads with their own candidate counts (``adakv_counts_heads`` doc)."""
    heads = len(scores)
    n = [len(s) for s in scores]
    total = min(heads * sel, sum(n))
    if total in (0, sum(n)):
        return n if total else [0] * heads
    flat = sorted(((h, c) for h in range(heads) for c in range(n[h])),
                  key=lambda hc: (-scores[hc[0]][hc[1]], hc[0], hc[1]))[:total]
    hits = [sum(1 for hh, _ in flat if hh == h) for h in range(heads)]
    share = total / heads
    quota = [alpha * share + (1 - alpha) * hits[h] for h in range(heads)]
    lower = [min(math.floor(alpha * share), n[h]) for h in range(heads)]
    caps = [max(min(math.floor(quota[h]), n[h]), lower[h]) for h in range(heads)]
    frac = [quota[h] - caps[h] for h in range(heads)]
    diff = total - sum(caps)
    give = _spread(max(diff, 0), [n[h] - caps[h] for h in range(heads)],
                   sorted(range(heads), key=lambda h: (-frac[h], -hits[h], h)))
    take = _spread(max(-diff, 0), [caps[h] - lower[h] for h in range(heads)],
                   sorted(range(heads), key=lambda h: (-(caps[h] - lower[h]), frac[h], h)))
    return [caps[h] + give[h] - take[h] for h in range(heads)]


def _gvote_keep(ev: DecodeRows, r: int, sel: int) -> list[set[int]]:
    """GVote: exact mass above each key per voter, min over a head's voters, min-pooled
    over its candidates, kept below p, the smallest ``sel`` (ties: older)."""
    cfg = ev.cfg
    voters = gvote_voters(ev.window_queries[r:r + 1], cfg.gvote_samples, cfg.gvote_seed,
                          ev.layer_idx)[0]  # [V, Hq, D]
    heads = ev.num_heads
    group = voters.shape[1] // heads
    out = []
    for h in range(heads):
        n = int(ev.num_candidates[r, h])
        keys = torch.cat([ev.keys[r, h, :n], ev.window_keys[r, h]])
        best = [math.inf] * n
        for v in range(voters.shape[0]):
            for g in range(group):
                p = _softmax([float(voters[v, h * group + g] @ k) * ev.scale for k in keys])
                for c in range(n):
                    above = sum(x for x in p if x > p[c])
                    best[c] = min(best[c], above)
        k = cfg.pool_kernel // 2
        pooled = [min(best[max(0, c - k): c + k + 1]) for c in range(n)]
        voted = [c for c in range(n) if pooled[c] < cfg.gvote_p or cfg.gvote_p >= 1]
        out.append(set(sorted(voted, key=lambda c: (pooled[c], c))[: min(sel, n)]))
    return out


def _direct(ev: DecodeRows) -> list[list[set[int]]]:
    """Kept candidate indices per (row, head), by each method's definition."""
    cfg, method = ev.cfg, ev.cfg.method
    out = []
    for r in range(ev.keys.shape[0]):
        sel = ev.budgets[r] - cfg.window
        n = ev.num_candidates[r].tolist()
        if method == "streamingllm":
            s = cfg.sink_tokens
            out.append([set(range(c)) if sel >= c else
                        set(range(s)) | set(range(c - (sel - s), c)) for c in n])
        elif method == "gvote":
            out.append(_gvote_keep(ev, r, sel))
        else:
            scores = [_window_scores(ev, r, h) for h in range(ev.num_heads)]
            caps = (_adakv_caps(scores, sel, cfg.alpha) if method == "adakv"
                    else [min(sel, c) for c in n])
            out.append([_top(s, k) for s, k in zip(scores, caps, strict=True)])
    return out


def _as_sets(mask: torch.Tensor) -> list[list[set[int]]]:
    return [[set(mask[r, h].nonzero().flatten().tolist()) for h in range(mask.shape[1])]
            for r in range(mask.shape[0])]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pooling,gqa_reduce,pool_kernel", [("max", "mean", 5),
                                                            ("avg", "max", 3),
                                                            ("max", "max", 1)])
def test_reselect_matches_direct_definition(rng, method, pooling, gqa_reduce, pool_kernel):
    window, budget = rng.randint(2, 4), rng.randint(9, 14)
    extra = {"gvote_samples": 3, "gvote_p": 0.9} if method == "gvote" else {}
    cfg = _cfg(method, budget, window, pooling=pooling, gqa_reduce=gqa_reduce,
               pool_kernel=pool_kernel, alpha=0.3, sink_tokens=2, **extra)
    sel = budget - window
    # Uneven counts per head, some below the selectable count, one head with none.
    counts = [[rng.randint(sel + 1, sel + 12), rng.randint(1, sel + 12)],
              [rng.randint(0, sel), rng.randint(sel + 3, sel + 15)]]
    budgets = [budget, budget + rng.randint(0, 3)]
    ev = _event(rng, cfg, counts, budgets, layer_idx=rng.randint(0, 5))
    got = get_method(method).reselect(ev)
    assert got.shape == ev.keys.shape[:3] and got.dtype == torch.bool
    assert _as_sets(got) == _direct(ev), f"{rng} counts={counts}"


# --------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("method", ["snapkv", "adakv", "pyramidkv", "streamingllm"])
def test_totals_and_safeguard(rng, method):
    for trial in range(20):
        heads, window = rng.randint(1, 6), rng.randint(1, 6)
        budget = window + rng.randint(1, 20)
        alpha = float(torch.rand(1, generator=rng.gen))
        cfg = _cfg(method, budget, window, alpha=alpha, sink_tokens=min(4, budget - window))
        sel = budget - window
        counts = [[rng.randint(0, 3 * sel) for _ in range(heads)] for _ in range(3)]
        if max(max(c) for c in counts) == 0:
            counts[0][0] = 1
        ev = _event(rng, cfg, counts, [budget] * 3, group=rng.randint(1, 3))
        mask = get_method(method).reselect(ev)
        kept = mask.sum(-1)
        msg = f"{rng} trial={trial} counts={counts} kept={kept.tolist()} alpha={alpha}"
        width = mask.shape[2]
        padding = torch.arange(width) >= ev.num_candidates[..., None]
        assert not (mask & padding).any(), msg
        for r, row in enumerate(counts):
            if method == "adakv":
                total = min(heads * sel, sum(row))
                assert int(kept[r].sum()) == total, msg
                floor = math.floor(alpha * total / heads)
                assert all(int(kept[r, h]) >= min(floor, n) for h, n in enumerate(row)), msg
                if total == heads * sel:  # the prompt's floor(alpha * s)
                    assert all(int(kept[r, h]) >= min(math.floor(alpha * sel), n)
                               for h, n in enumerate(row)), msg
            else:
                assert kept[r].tolist() == [min(sel, n) for n in row], msg


def test_adakv_heads_equals_rows_with_equal_counts(rng):
    for trial in range(50):
        rows, heads, cand = rng.randint(1, 3), rng.randint(1, 8), rng.randint(1, 30)
        selectable = [rng.randint(0, cand + 3) for _ in range(rows)]
        alpha = float(torch.rand(1, generator=rng.gen))
        scores = rng.randn(rows, heads, cand).double() * rng.randn(rows, heads, 1).exp()
        got = adakv_counts_heads(scores, torch.full((rows, heads), cand), selectable, alpha)
        want = adakv_counts_rows(scores, [cand] * rows, selectable, alpha)
        assert torch.equal(got, want), f"{rng} trial={trial}"


def test_window_queries_see_candidates_and_window_only(rng):
    """Changing padding keys, or window keys a query cannot see, leaves the scores alone;
    a visible window key changes them."""
    cfg = _cfg("snapkv", 12, 3)
    ev = _event(rng, cfg, [[10, 4]], [12])
    base = get_method("snapkv").decode_scores(ev)
    keys = ev.keys.clone()
    keys[0, 1, 4:] = 1e3
    same = get_method("snapkv").decode_scores(DecodeRows(**{**ev.__dict__, "keys": keys}))
    assert torch.equal(base, same), str(rng)
    wkeys = ev.window_keys.clone()
    wkeys[0, :, 0] += 1.0  # seen by every window query
    moved = get_method("snapkv").decode_scores(
        DecodeRows(**{**ev.__dict__, "window_keys": wkeys}))
    assert not torch.allclose(base[0, 0, :10], moved[0, 0, :10]), str(rng)


# --------------------------------------------------------------- prompt = first event


def _paged(keys: torch.Tensor, bs: int) -> torch.Tensor:
    """[H, L, D] -> [nb, H, bs, D] blocks (zero padded)."""
    heads, length, dim = keys.shape
    nb = cdiv(length, bs)
    pad = torch.zeros(heads, nb * bs, dim, dtype=keys.dtype)
    pad[:, :length] = keys
    return pad.view(heads, nb, bs, dim).permute(1, 0, 2, 3)


@pytest.mark.parametrize("method", METHODS)
def test_event_over_a_prompt_equals_prefill_selection(rng, method):
    """Re-selection with every older prompt token as candidate = the prompt's keep_masks."""
    heads, group, dim, window, bs = 2, 4, 8, 4, 4
    extra = {"gvote_samples": 4} if method == "gvote" else {}
    cfg = _cfg(method, 20, window, pool_kernel=5, **extra)
    lens = [rng.randint(30, 50), rng.randint(30, 50)]
    keys = [rng.randn(heads, n, dim).double() for n in lens]
    wq = torch.stack([rng.randn(window, heads * group, dim).double() for _ in lens])
    blocks = [_paged(k, bs) for k in keys]
    cache = torch.cat(blocks)
    nb = max(b.shape[0] for b in blocks)
    table = torch.zeros(2, nb, dtype=torch.int32)
    table[0, : blocks[0].shape[0]] = torch.arange(blocks[0].shape[0])
    table[1, : blocks[1].shape[0]] = blocks[0].shape[0] + torch.arange(blocks[1].shape[0])
    m = get_method(method)
    budgets = [m.layer_budgets(cfg, n, 4)[1] for n in lens]
    batch = LayerRows(cfg=cfg, layer_idx=1, prompt_lens=lens, budgets=budgets,
                      key_cache=cache, block_table=table, rows=[0, 1], scale=dim ** -0.5,
                      window_queries=wq)
    prefill = m.keep_masks(batch)
    width = max(lens) - window
    cand = torch.zeros(2, heads, width, dim, dtype=F64)
    pos = torch.zeros(2, heads, width, dtype=torch.long)
    for r, n in enumerate(lens):
        cand[r, :, : n - window] = keys[r][:, : n - window]
        pos[r, :, : n - window] = torch.arange(n - window)
    ev = DecodeRows(cfg=cfg, layer_idx=1, budgets=budgets, keys=cand,
                    num_candidates=torch.tensor([[n - window] * heads for n in lens]),
                    positions=pos,
                    window_keys=torch.stack([k[:, -window:] for k in keys]),
                    window_queries=wq, seq_lens=lens, scale=dim ** -0.5)
    got = m.reselect(ev)
    for r, n in enumerate(lens):
        assert torch.equal(got[r, :, : n - window], prefill[r, :, : n - window]), str(rng)
        assert prefill[r, :, n - window: n].all()


# --------------------------------------------------------------------------- simulation


class _Request:
    """One request of one layer: dense K/V of every position, what each head holds."""

    def __init__(self, rng: Rng, length: int, heads: int, group: int, dim: int):
        self.rng, self.heads, self.group, self.dim = rng, heads, group, dim
        self.keys = rng.randn(heads, length, dim).double()
        self.values = rng.randn(heads, length, dim).double()
        self.queries = rng.randn(length, heads * group, dim).double()
        self.pages: list[list[int]] = []  # per head: positions in head-pages
        self.tail_start = length

    @property
    def seq_len(self) -> int:
        return self.keys.shape[1]

    def held(self, h: int) -> list[int]:
        return self.pages[h] + list(range(self.tail_start, self.seq_len))

    def append(self) -> None:
        rng = self.rng
        self.keys = torch.cat([self.keys, rng.randn(self.heads, 1, self.dim).double()], 1)
        self.values = torch.cat([self.values, rng.randn(self.heads, 1, self.dim).double()], 1)
        q = rng.randn(1, self.heads * self.group, self.dim).double()
        self.queries = torch.cat([self.queries, q])


def _check_attention(rng: Rng, reqs: list[_Request], bs: int, page_blocks: int) -> None:
    """Fresh queries at each row's last position: the head-wise decode over head-pages
    (entries [0, page_blocks)) + tail (null entries between hold garbage) equals dense
    float64 attention over exactly the held tokens."""
    heads, group, dim = reqs[0].heads, reqs[0].group, reqs[0].dim
    blocks = [torch.randn(1, heads, bs, dim, generator=rng.gen).double() * 50]  # null
    vblocks = [torch.randn(1, heads, bs, dim, generator=rng.gen).double() * 50]
    width = max(cdiv(q.seq_len, bs) for q in reqs)
    table = torch.zeros(len(reqs), width, dtype=torch.int32)
    starts = torch.zeros(len(reqs), heads, dtype=torch.long)
    counts = torch.zeros(len(reqs), heads, dtype=torch.long)
    for r, q in enumerate(reqs):
        pk = torch.randn(page_blocks, heads, bs, dim, generator=rng.gen).double() * 50
        pv = torch.randn(page_blocks, heads, bs, dim, generator=rng.gen).double() * 50
        entry = 0
        for h in range(heads):
            starts[r, h], counts[r, h] = entry, len(q.pages[h])
            for i, p in enumerate(q.pages[h]):
                e = entry + i // bs
                pk[e // heads, e % heads, i % bs] = q.keys[h, p]
                pv[e // heads, e % heads, i % bs] = q.values[h, p]
            entry += cdiv(len(q.pages[h]), bs)
        assert entry <= page_blocks * heads, f"{rng} pages {entry} > {page_blocks} blocks"
        table[r, :page_blocks] = sum(b.shape[0] for b in blocks) + torch.arange(page_blocks)
        blocks.append(pk)
        vblocks.append(pv)
        first = q.tail_start // bs
        assert first >= page_blocks, f"{rng} tail entry {first} inside the pages"
        for j in range(first, cdiv(q.seq_len, bs)):
            tk = torch.randn(1, heads, bs, dim, generator=rng.gen).double() * 50
            tv = torch.randn(1, heads, bs, dim, generator=rng.gen).double() * 50
            for s in range(bs):
                if q.tail_start <= j * bs + s < q.seq_len:
                    tk[0, :, s], tv[0, :, s] = q.keys[:, j * bs + s], q.values[:, j * bs + s]
            table[r, j] = sum(b.shape[0] for b in blocks)
            blocks.append(tk)
            vblocks.append(tv)
    kc, vc = torch.cat(blocks), torch.cat(vblocks)
    query = torch.randn(len(reqs), heads * group, dim, generator=rng.gen).double()
    out = torch.zeros_like(query)
    n = len(reqs)
    rows = row_table(torch.arange(n), torch.arange(n), torch.arange(n), torch.arange(1, n + 1),
                     torch.tensor([q.tail_start for q in reqs]),
                     torch.tensor([q.seq_len for q in reqs]))
    scale = dim ** -0.5
    headwise_attention_ranges_reference(query, kc, vc, starts, counts, table, rows, n, scale,
                                        out)
    for r, q in enumerate(reqs):
        for h in range(heads):
            idx = torch.tensor(q.held(h))
            k, v = q.keys[h, idx], q.values[h, idx]
            for g in range(group):
                a = torch.softmax(query[r, h * group + g] @ k.T * scale, -1)
                assert torch.allclose(out[r, h * group + g], a @ v, atol=1e-10), str(rng)


@pytest.mark.parametrize("method", METHODS)
def test_multi_event_simulation(rng, method):
    heads, group, dim, window, bs, num_layers = 2, 4, 8, 4, 4, 3
    layer = rng.randint(0, num_layers - 1)
    budget, interval = 20, rng.randint(2, 7)
    extra = {"gvote_samples": 3, "gvote_p": 0.8} if method == "gvote" else {}
    cfg = _cfg(method, budget, window, pool_kernel=3, alpha=0.25, sink_tokens=2, **extra)
    m = get_method(method)
    reqs = [_Request(rng, rng.randint(60, 80), heads, group, dim) for _ in range(2)]
    lens = [q.seq_len for q in reqs]
    # Prefill: the prompt path on a paged copy of the prompt keys.
    blocks = [_paged(q.keys, bs) for q in reqs]
    nb = max(b.shape[0] for b in blocks)
    table = torch.stack([torch.arange(nb), blocks[0].shape[0] + torch.arange(nb)]).int()
    prompt_budgets = [m.layer_budgets(cfg, n, num_layers)[layer] for n in lens]
    keep = m.keep_masks(LayerRows(
        cfg=cfg, layer_idx=layer, prompt_lens=lens, budgets=prompt_budgets,
        key_cache=torch.cat(blocks), block_table=table, rows=[0, 1], scale=dim ** -0.5,
        window_queries=torch.stack([q.queries[-window:] for q in reqs])))
    for r, q in enumerate(reqs):
        q.pages = [keep[r, h, : lens[r]].nonzero().flatten().tolist() for h in range(heads)]
    b_l = m.decode_layer_budgets(cfg, budget, num_layers)[layer]
    sel = b_l - window
    page_cap = max_head_pages(heads, sel, heads * sel, bs, m.uniform)
    plans = [plan_decode(cfg, n, heads, bs, num_layers, interval=interval) for n in lens]
    prefill_cap = max(max_head_pages(heads, b, n, bs, m.uniform)
                      for b, n in zip(prompt_budgets, lens, strict=True))
    page_blocks = max(max(p.page_blocks for p in plans), cdiv(page_cap, heads),
                      cdiv(prefill_cap, heads))
    _check_attention(rng, reqs, bs, page_blocks)
    events = 0
    for generated in range(1, 6 * interval + 2 * window):
        for q in reqs:
            q.append()
        for q in reqs:  # bounded whatever the generation length
            held = [len(q.held(h)) for h in range(heads)]
            assert sum(held) <= heads * (b_l + interval + window), f"{rng} {held}"
            assert method == "adakv" or max(held) <= b_l + interval + window, f"{rng} {held}"
        if generated % interval or generated < window:
            continue
        events += 1
        cand = [[[p for p in q.held(h) if p < q.seq_len - window] for h in range(heads)]
                for q in reqs]
        for q in reqs:
            for h in range(heads):
                assert set(range(q.seq_len - window, q.seq_len)) <= set(q.held(h)), str(rng)
        width = max(len(c) for row in cand for c in row)
        keys = torch.zeros(2, heads, width, dim, dtype=F64)
        pos = torch.zeros(2, heads, width, dtype=torch.long)
        for r, q in enumerate(reqs):
            for h in range(heads):
                idx = torch.tensor(cand[r][h], dtype=torch.long)
                keys[r, h, : len(idx)], pos[r, h, : len(idx)] = q.keys[h, idx], idx
        ev = DecodeRows(
            cfg=cfg, layer_idx=layer, budgets=[b_l, b_l], keys=keys,
            num_candidates=torch.tensor([[len(c) for c in row] for row in cand]),
            positions=pos,
            window_keys=torch.stack([q.keys[:, -window:] for q in reqs]),
            window_queries=torch.stack([q.queries[-window:] for q in reqs]),
            seq_lens=[q.seq_len for q in reqs], scale=dim ** -0.5)
        mask = m.reselect(ev)
        if method != "gvote" or events <= 2:  # the direct vote is slow
            assert _as_sets(mask) == _direct(ev), f"{rng} event {events}"
        for r, q in enumerate(reqs):
            before = [set(q.held(h)) for h in range(heads)]
            q.pages = [[p for p, k in zip(cand[r][h], mask[r, h].tolist(), strict=False) if k]
                       for h in range(heads)]
            q.tail_start = q.seq_len - window
            kept = [len(q.held(h)) for h in range(heads)]
            msg = f"{rng} event {events} row {r} kept={kept}"
            assert all(set(q.held(h)) <= before[h] for h in range(heads)), msg
            if method == "adakv":
                assert sum(kept) == heads * b_l, msg
                assert min(kept) >= window + math.floor(0.25 * sel), msg
            elif method == "gvote":
                assert max(kept) <= b_l, msg
            else:
                assert kept == [b_l] * heads, msg
        _check_attention(rng, reqs, bs, page_blocks)
    assert events >= 5


# --------------------------------------------------------------------------- errors


def test_bad_inputs_are_refused(rng):
    cfg = _cfg("snapkv", 12, 3)
    ev = _event(rng, cfg, [[6, 4]], [12])
    snap = get_method("snapkv")

    def with_(**kw):
        return DecodeRows(**{**ev.__dict__, **kw})

    with pytest.raises(ValueError, match=r"decode budget \(3\) must be greater than the window"):
        snap.reselect(with_(budgets=[3]))
    with pytest.raises(ValueError, match="window_keys must be"):
        snap.reselect(with_(window_keys=ev.window_keys[:, :, :2]))
    with pytest.raises(ValueError, match="window_queries must be"):
        snap.reselect(with_(window_queries=ev.window_queries[:, :, :3]))
    with pytest.raises(ValueError, match="num_candidates"):
        snap.reselect(with_(num_candidates=torch.tensor([[7, 4]])))
    bad = ev.positions.clone()
    bad[0, 0, 1] = bad[0, 0, 0]
    with pytest.raises(ValueError, match="must increase strictly"):
        snap.reselect(with_(positions=bad))
    late = ev.positions.clone()
    late[0, 1, 3] = ev.seq_lens[0] - 1  # inside the window
    with pytest.raises(ValueError, match="must increase strictly within"):
        snap.reselect(with_(positions=late))
    with pytest.raises(ValueError, match="2 budgets"):
        snap.reselect(with_(budgets=[12, 12]))
    with pytest.raises(ValueError, match="no decode-time re-selection"):
        get_method("none").reselect(ev)
    stream = _cfg("streamingllm", 12, 3, sink_tokens=4)
    with pytest.raises(ValueError, match="sink_tokens"):
        get_method("streamingllm").reselect(with_(cfg=stream, budgets=[6]))
