"""Random decode events at real sizes for the GPU tests of the decode-event kernels
(``test_decode_event_kernels.py``), built on any device (the builders and checks also run
on CPU, with the Triton functions under the interpreter, to check the test logic).

A layer's cache ``kv [nb, H, bs, 2D]`` (keys ``[..., :D]``, values after: strided views),
NaN first so that a read of a slot nobody may read shows. Per row, as a compaction leaves
them: head-pages from block-table entry 0, heads in order, a random number of tokens per
head (row 0: a head with none); the tail from ``tail_start`` (past room for ``P_max``
head-page blocks, null entries between) to ``S``, window included. Rows sit in shuffled
batch rows and slots; unused slots hold ranges that would read garbage. The checks
compare a kernel (through the dispatcher on CUDA) with its torch reference; each kernel
call runs under sync debug mode "error" on CUDA (nothing may wait for the GPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from vllm_adakv.kernels.allocation import (
    safeguard_caps_heads_reference,
    safeguard_caps_reference,
)
from vllm_adakv.kernels.compaction import compact_decode_event_reference
from vllm_adakv.kernels.decode import row_table
from vllm_adakv.kernels.scoring import score_decode_event_reference
from vllm_adakv.kernels.voting import decode_voter_probs_event_reference

BLOCK_SIZE = 16
FP8_NAN = 0x7F  # e4m3fn


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def new_seed() -> int:
    """A fresh seed per run (from the global RNG, itself unseeded)."""
    return int(torch.randint(0, 2**31 - 1, ()))


@contextlib.contextmanager
def no_host_sync(device: torch.device | str) -> Iterator[None]:
    """On CUDA, any synchronising call inside raises (sync debug mode "error")."""
    if torch.device(device).type != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@dataclass
class Event:
    """One decode event of one layer (module doc); tensors on ``kv.device``."""

    seed: int
    kv: torch.Tensor  # [nb, H, bs, 2D]
    dim: int
    window: int
    page_start: torch.Tensor  # int32 [slots, H]
    kept_counts: torch.Tensor  # int32 [slots, H]
    block_table: torch.Tensor  # int32 [B, entries]
    rows: torch.Tensor  # decode.row_table [R, 7]
    counts: torch.Tensor  # int64 [R, H]: candidates (head-page tokens + tail before window)
    width: int
    p_max: list[int]  # block-table entries with real blocks from 0, per row

    @property
    def keys(self) -> torch.Tensor:
        return self.kv[..., : self.dim]

    @property
    def values(self) -> torch.Tensor:
        return self.kv[..., self.dim :]

    def gen(self, salt: int) -> torch.Generator:
        """A CPU generator for this event's derived inputs."""
        return torch.Generator().manual_seed(self.seed * 7 + salt)


def build_event(seed: int, device: torch.device | str, *, num_rows: int, heads: int = 8,
                dim: int = 128, window: int = 32, dtype: torch.dtype = torch.bfloat16,
                max_page_tokens: int = 1000, tail: tuple[int, int] = (100, 400),
                seq: tuple[int, int] = (2048, 8192)) -> Event:
    """A random event (module doc): per head ``[0, max_page_tokens]`` head-page tokens,
    a tail of ``tail`` tokens before the window, ``S`` in ``seq`` where room allows."""
    gen = torch.Generator().manual_seed(seed)

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (), generator=gen))

    kept = torch.randint(0, max_page_tokens + 1, (num_rows, heads), generator=gen)
    kept[0, randint(0, heads - 1)] = 0
    n_tail = [randint(*tail) for _ in range(num_rows)]
    starts, p_max, tail_start, seq_len = [], [], [], []
    for r in range(num_rows):
        pages = [cdiv(int(n), BLOCK_SIZE) for n in kept[r]]
        starts.append([sum(pages[:h]) for h in range(heads)])
        # Room for any mask's pages: every candidate kept.
        p_max.append(max(cdiv(sum(pages), heads),
                         cdiv(sum(cdiv(int(n) + n_tail[r], BLOCK_SIZE) for n in kept[r]),
                              heads)))
        lo = p_max[r] * BLOCK_SIZE
        target = randint(*seq) - n_tail[r] - window
        tail_start.append(max(lo, target))
        seq_len.append(tail_start[r] + n_tail[r] + window)
    entries = max(cdiv(s, BLOCK_SIZE) for s in seq_len)
    need = [p_max[r] + cdiv(seq_len[r], BLOCK_SIZE) - tail_start[r] // BLOCK_SIZE
            for r in range(num_rows)]
    num_blocks = sum(need) + 4  # block 0: the null block; a few spare
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).int()
    batch_rows = torch.randperm(num_rows + 1, generator=gen)[:num_rows]
    slots = torch.randperm(num_rows + 2, generator=gen)[:num_rows]
    table = torch.zeros(num_rows + 1, entries, dtype=torch.int32)
    page_start = torch.full((num_rows + 2, heads), 10**5, dtype=torch.int32)
    kept_counts = torch.full((num_rows + 2, heads), 10**3, dtype=torch.int32)
    shape = (num_blocks, heads, BLOCK_SIZE, 2 * dim)
    if dtype.itemsize == 1:  # fill_ takes no fp8
        kv = torch.full(shape, FP8_NAN, dtype=torch.uint8, device=device).view(dtype)
    else:
        kv = torch.full(shape, float("nan"), dtype=dtype, device=device)
    raw = kv.view(torch.uint8)  # [nb, H, bs, 2D * itemsize]: index_put takes no fp8
    used = 0
    for r in range(num_rows):
        b, s = int(batch_rows[r]), int(slots[r])
        first_tail = tail_start[r] // BLOCK_SIZE
        live = list(range(p_max[r])) + list(range(first_tail, cdiv(seq_len[r], BLOCK_SIZE)))
        table[b, live] = ids[used : used + len(live)]
        used += len(live)
        page_start[s] = torch.tensor(starts[r], dtype=torch.int32)
        kept_counts[s] = kept[r].int()
        # Head-page tokens: entry g = start + i // bs is block table[b, g // H], slot g % H.
        blk, slot, pos = [], [], []
        for h in range(heads):
            i = torch.arange(int(kept[r, h]))
            g = starts[r][h] + i // BLOCK_SIZE
            blk.append(table[b, g // heads].long())
            slot.append(g % heads)
            pos.append(i % BLOCK_SIZE)
        blk_t, slot_t, pos_t = (torch.cat(x).to(device) for x in (blk, slot, pos))
        raw[blk_t, slot_t, pos_t] = _random_bytes(len(blk_t), (2 * dim,), dtype, gen, device)
        p = torch.arange(tail_start[r], seq_len[r])
        tblk = table[b, p // BLOCK_SIZE].long().to(device)
        raw[tblk, :, (p % BLOCK_SIZE).to(device)] = _random_bytes(
            len(p), (heads, 2 * dim), dtype, gen, device)
    counts = kept + torch.tensor(n_tail)[:, None]
    zeros = torch.zeros(num_rows, dtype=torch.int32)
    rows = row_table(batch_rows, slots, zeros, zeros + 1, torch.tensor(tail_start),
                     torch.tensor(seq_len))
    width = int(counts.max()) + randint(0, 7)
    return Event(seed=seed, kv=kv, dim=dim, window=window, page_start=page_start.to(device),
                 kept_counts=kept_counts.to(device), block_table=table.to(device),
                 rows=rows.to(device), counts=counts, width=width, p_max=p_max)


def _random_bytes(n: int, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator,
                  device: torch.device | str) -> torch.Tensor:
    """``n`` random vectors of ``shape`` stored in ``dtype``, as bytes on ``device``."""
    x = torch.randn(n, *shape, generator=gen).to(device)
    return x.to(dtype).view(torch.uint8)


def window_queries(ev: Event, q_heads: int, num: int, salt: int = 1) -> torch.Tensor:
    """Random bf16 queries ``[R, num, Hq, D]`` (window queries or voters)."""
    r = ev.rows.shape[0]
    q = torch.randn(r, num, q_heads, ev.dim, generator=ev.gen(salt)) * 1.5
    return q.to(torch.bfloat16).to(ev.kv.device)


def check_scores(ev: Event, fn: Callable, q_heads: int, **kw) -> torch.Tensor:
    """``fn`` (``score_decode_event``'s contract) == the fp32 reference on the same bf16
    queries and cache: the same -inf padding, finite elsewhere, 2e-3 absolute."""
    q = window_queries(ev, q_heads, ev.window)
    args = (ev.keys, ev.page_start, ev.kept_counts, ev.block_table, ev.rows, ev.width,
            ev.dim**-0.5)
    with no_host_sync(ev.kv.device):
        got = fn(q, *args, **kw)
    want = score_decode_event_reference(q.float(), *args, **kw)
    msg = f"seed {ev.seed} {kw}"
    assert got.shape == want.shape == (ev.rows.shape[0], ev.kv.shape[1], ev.width), msg
    assert torch.equal(torch.isinf(got), torch.isinf(want)), msg
    valid = ~torch.isinf(want)
    assert bool(valid.sum(-1).cpu().eq(ev.counts).all()), msg
    assert bool(torch.isfinite(got[valid]).all()), msg
    torch.testing.assert_close(got[valid].float(), want[valid], rtol=2e-2, atol=2e-3, msg=msg)
    return want


def check_voter_probs(ev: Event, fn: Callable, q_heads: int, num_voters: int) -> None:
    """``fn`` (``decode_voter_probs``'s contract) == the fp32 reference on the same bf16
    voters and cache (probabilities: 1e-5 absolute, 1e-3 relative)."""
    voters = window_queries(ev, q_heads, num_voters, salt=2)
    args = (ev.keys, ev.page_start, ev.kept_counts, ev.block_table, ev.rows, ev.window,
            ev.width, ev.dim**-0.5)
    with no_host_sync(ev.kv.device):
        got = fn(voters, *args)
    want = decode_voter_probs_event_reference(voters.float(), *args)
    msg = f"seed {ev.seed}"
    assert got.dtype == torch.float32 and got.shape == want.shape, msg
    assert bool(torch.isfinite(got).all()), msg
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5, msg=msg)
    # Every voter's probabilities over its candidates and window sum to 1.
    sums = got.double().sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-4, msg=msg)


def topk_hits(scores: torch.Tensor, counts: torch.Tensor, totals: list[int]) -> torch.Tensor:
    """Per row, how many of the row's top ``totals[r]`` candidates (over every head) each
    head holds, as Ada-KV counts them (``[R, H]`` int64)."""
    rows, heads, width = scores.shape
    valid = torch.arange(width, device=scores.device) < counts.to(scores.device)[..., None]
    flat = torch.where(valid, scores, float("-inf")).flatten(1)
    hits = torch.zeros(rows, heads, dtype=torch.long, device=scores.device)
    for r, t in enumerate(totals):
        top = flat[r].topk(t).indices // width
        hits[r] = torch.bincount(top, minlength=heads)
    return hits


def check_safeguard_heads(ev: Event, fn: Callable, scores: torch.Tensor, alpha: float,
                          gen: torch.Generator) -> None:
    """``fn`` (``safeguard_caps_heads``'s contract) == the reference, integer for integer,
    on an event's top-T hits (T random in ``[0, sum n]``, one row keeping everything)."""
    room = ev.counts.sum(1)
    totals = (torch.rand(len(room), generator=gen) * (room + 1)).long().clamp(max=room)
    totals[-1] = room[-1]
    dev = ev.kv.device
    hits = topk_hits(scores, ev.counts, totals.tolist())
    totals_d, bounds = totals.to(dev), ev.counts.to(dev)
    with no_host_sync(dev):
        got = fn(hits, totals_d, alpha, bounds)
    want = safeguard_caps_heads_reference(hits, totals_d, alpha, bounds)
    msg = f"seed {ev.seed} alpha={alpha}\nhits {hits}\ntotals {totals}\ngot {got}\nwant {want}"
    assert got.dtype == torch.int64 and torch.equal(got, want), msg
    assert torch.equal(got.sum(1).cpu(), totals), msg
    assert bool(((got >= 0) & (got <= bounds)).all()), msg


def check_safeguard_prompt(fn: Callable, device: torch.device | str, seed: int, *,
                           num_rows: int, heads: int, alpha: float,
                           lengths: tuple[int, int] = (2048, 8192)) -> None:
    """``fn`` (``safeguard_caps``'s contract: the prompt's call, one bound ``C`` for every
    head, ``T = H * s``) == ``safeguard_caps_reference`` on top-T hits of random scores
    (some rows with clumped heads)."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(lengths[0], lengths[1] + 1, (num_rows,), generator=gen)
    sel = [int(torch.randint(1, int(c), (), generator=gen)) for c in lens]
    width = int(lens.max())
    bias = torch.randn(num_rows, heads, 1, generator=gen) * torch.rand(num_rows, 1, 1,
                                                                        generator=gen) * 3
    scores = (torch.rand(num_rows, heads, width, generator=gen) + bias).to(device)
    counts = lens[:, None].expand(num_rows, heads)
    hits = topk_hits(scores, counts, [heads * s for s in sel])
    with no_host_sync(device):
        got = fn(hits, sel, alpha, lens.tolist())
    want = safeguard_caps_reference(hits, sel, alpha, lens.tolist())
    msg = f"seed {seed} alpha={alpha} H={heads}\nhits {hits}\nsel {sel}\nC {lens.tolist()}"
    assert got.dtype == torch.int64 and torch.equal(got, want), f"{msg}\n{got}\n{want}"
    assert got.sum(1).tolist() == [heads * s for s in sel], msg


def random_keep_mask(ev: Event, gen: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    """A mask ``[R, H, width]`` (per head its own keep rate; row 0 a head keeping every
    candidate, row 1 one keeping none of its head-page tokens, row 2 one keeping nothing)
    and a ``P`` per row in ``[needed, P_max]``."""
    rows, heads = ev.counts.shape
    rate = torch.rand(rows, heads, 1, generator=gen)
    mask = torch.rand(rows, heads, ev.width, generator=gen) < rate
    mask &= torch.arange(ev.width) < ev.counts[..., None]
    h = int(torch.randint(heads, (), generator=gen))
    mask[0, h] = torch.arange(ev.width) < ev.counts[0, h]
    slots = ev.rows[:, 1].long().cpu()
    if rows > 1:
        h = int(torch.randint(heads, (), generator=gen))
        mask[1, h, : int(ev.kept_counts[slots[1], h])] = False
    if rows > 2:
        mask[2, int(torch.randint(heads, (), generator=gen))] = False
    blocks = []
    for r in range(rows):
        pages = sum(cdiv(int(c), BLOCK_SIZE) for c in mask[r].sum(1))
        need = cdiv(pages, heads)
        blocks.append(int(torch.randint(need, max(need, ev.p_max[r]) + 1, (),
                                        generator=gen)))
    return mask.to(ev.kv.device), blocks


def check_compaction(ev: Event, fn: Callable, gen: torch.Generator) -> None:
    """``fn`` (``compact_decode_event``'s contract) leaves the caches byte for byte as the
    reference leaves a copy of them and returns the same page_start, counts, tail_start."""
    mask, blocks = random_keep_mask(ev, gen)
    want_kv = ev.kv.clone()
    args = (ev.page_start, ev.kept_counts, ev.block_table, ev.rows, mask, ev.window, blocks)
    want = compact_decode_event_reference(want_kv[..., : ev.dim], want_kv[..., ev.dim :],
                                          *args)
    with no_host_sync(ev.kv.device):
        got = fn(ev.keys, ev.values, *args)
    msg = f"seed {ev.seed} P={blocks}"
    for name, g, w in zip(("page_start", "counts", "tail_start"), got, want, strict=True):
        assert g.dtype == torch.int32 and torch.equal(g, w), f"{msg}: {name}"
    assert torch.equal(want[1].cpu(), mask.sum(-1).int().cpu()), msg
    assert torch.equal(ev.kv.view(torch.uint8), want_kv.view(torch.uint8)), \
        f"{msg}: caches differ after compaction (exact copy expected)"
