"""Compaction of one decode event (issue 29): ``compact_decode_event_reference`` and the
Triton version (run by the interpreter on CPU).

Fresh random layouts each run (the seed is in the failure message): several rows in
shuffled batch rows and slots, GQA, block size 16, old head-pages in entries from 0 with
uneven per-head counts (row 0: a head with no head-page token), a tail from
``tail_start`` past them, null entries between (block 0, full of large garbage like every
slot nobody may read), and masks with uneven per-head kept counts (a head keeping none of its
head-page tokens, a head keeping every candidate, a head keeping nothing). Checked: the
head-wise decode over the new layout equals float64 attention over exactly the kept
tokens and the window; the Triton version leaves the caches byte for byte as the
reference does and returns the same ranges; two events in a row; the refusals.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from vllm_adakv.kernels import compact_decode_event  # noqa: E402
from vllm_adakv.kernels.compaction import compact_decode_event_reference  # noqa: E402
from vllm_adakv.kernels.decode import headwise_attention_ranges_reference, row_table  # noqa: E402

BLOCK_SIZE = 16
F64 = torch.float64
# What slots nobody may read hold: finite (the head-wise reference multiplies a hidden
# slot's value by a zero weight), large enough to spoil any attention that reads it.
_GARBAGE = 256.0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _new_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


class Layout:
    """A random paged layer and, per (row, head), the float64 truth of its candidates.

    The cache is ``kv [nb, H, bs, 2D]`` (keys ``[..., :D]``, values after: strided views),
    in ``dtype``; truths are the stored values read as float64 (fp8: raw, no scale).
    """

    def __init__(self, seed: int, *, heads: int = 3, dim: int = 16, window: int = 4,
                 num_rows: int = 3, dtype: torch.dtype = torch.float32,
                 extra_tokens: int = 0) -> None:
        self.seed, self.heads, self.dim, self.window, self.dtype = seed, heads, dim, window, dtype
        self.gen = gen = torch.Generator().manual_seed(seed)
        self.num_rows = num_rows
        old = [[self.randint(1, 40) for _ in range(heads)] for _ in range(num_rows)]
        old[0][self.randint(0, heads - 1)] = 0
        n_tail = [self.randint(0, 30) for _ in range(num_rows)]
        # Old head-pages: heads in order from entry 0, as a compaction leaves them.
        old_start, p_old = [], []
        for r in range(num_rows):
            pages = [_cdiv(n, BLOCK_SIZE) for n in old[r]]
            old_start.append([sum(pages[:h]) for h in range(heads)])
            p_old.append(_cdiv(sum(pages), heads))
        # Room for P up to twice the old blocks plus what a mask may keep.
        self.p_max = [max(p_old[r], _cdiv(sum(_cdiv(n + n_tail[r], BLOCK_SIZE)
                                              for n in old[r]), heads)) for r in range(num_rows)]
        tail_start = [self.p_max[r] * BLOCK_SIZE + self.randint(0, 20) for r in range(num_rows)]
        seq = [tail_start[r] + n_tail[r] + window for r in range(num_rows)]
        width_blocks = max(_cdiv(s + extra_tokens, BLOCK_SIZE) for s in seq)
        need = sum(width_blocks for _ in range(num_rows))
        self.num_blocks = need + 1
        ids = (torch.randperm(need, generator=gen) + 1).tolist()  # 0: the null block
        self.batch_rows = torch.randperm(num_rows + 1, generator=gen)[:num_rows]
        self.slots = torch.randperm(num_rows + 2, generator=gen)[:num_rows]
        self.block_table = torch.zeros(num_rows + 1, width_blocks, dtype=torch.int32)
        # Slots no row uses hold ranges that would read garbage.
        self.page_start = torch.full((num_rows + 2, heads), 10**5, dtype=torch.int32)
        self.kept_counts = torch.full((num_rows + 2, heads), 10**3, dtype=torch.int32)
        self.kv = torch.full((self.num_blocks, heads, BLOCK_SIZE, 2 * dim), _GARBAGE,
                             dtype=torch.float32).to(dtype)
        self.tail_start, self.seq = tail_start, seq
        self.cands: list[list[torch.Tensor]] = []  # [r][h]: [n, 2D] float64
        self.win: list[torch.Tensor] = []  # [r]: [w, H, 2D] float64
        self.tail: list[dict[int, torch.Tensor]] = []  # [r]: position -> [H, 2D]
        for r in range(num_rows):
            b, s = int(self.batch_rows[r]), int(self.slots[r])
            first_tail = tail_start[r] // BLOCK_SIZE
            for e in list(range(self.p_max[r])) + list(range(first_tail, width_blocks)):
                self.block_table[b, e] = ids.pop()
            self.page_start[s] = torch.tensor(old_start[r], dtype=torch.int32)
            self.kept_counts[s] = torch.tensor(old[r], dtype=torch.int32)
            row_cands = []
            for h in range(heads):
                stored = self.tokens(old[r][h])
                for i in range(old[r][h]):
                    g = old_start[r][h] + i // BLOCK_SIZE
                    blk = int(self.block_table[b, g // heads])
                    self.put((blk, g % heads, i % BLOCK_SIZE), stored[i])
                row_cands.append(stored.to(F64))
            self.cands.append(row_cands)
            self.tail.append({})
            for p in range(tail_start[r], seq[r]):
                self.append(r, p)
        self.refresh()

    def randint(self, lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (), generator=self.gen))

    def tokens(self, n: int) -> torch.Tensor:
        """``n`` random stored vectors ``[n, 2D]``."""
        return torch.randn(n, 2 * self.dim, generator=self.gen).to(self.dtype)

    def put(self, where: tuple, value: torch.Tensor) -> None:
        """``kv[where] = value`` (through bytes: index_put takes no fp8)."""
        self.kv.view(torch.uint8)[where] = value.view(torch.uint8)

    def append(self, r: int, p: int) -> None:
        """A new token at position ``p`` of row ``r`` (every head), in the tail."""
        stored = self.tokens(self.heads)
        blk = int(self.block_table[int(self.batch_rows[r]), p // BLOCK_SIZE])
        self.put((blk, slice(None), p % BLOCK_SIZE), stored)
        self.tail[r][p] = stored.to(F64)

    def refresh(self) -> None:
        """Candidates and window from the tail (after appending or an event)."""
        self.rows = row_table(self.batch_rows, self.slots, torch.zeros_like(self.slots),
                              torch.ones_like(self.slots), torch.tensor(self.tail_start),
                              torch.tensor(self.seq))
        for r in range(self.num_rows):
            s, w = self.seq[r], self.window
            self.win[r:r + 1] = [torch.stack([self.tail[r][p] for p in range(s - w, s)])]

    def candidates(self, r: int, h: int) -> torch.Tensor:
        """Row r, head h: its head-page tokens then the tail ``[tail_start, S - w)``."""
        tail = [self.tail[r][p][h] for p in range(self.tail_start[r], self.seq[r] - self.window)]
        return torch.cat([self.cands[r][h], torch.stack(tail) if tail else
                          torch.zeros(0, 2 * self.dim, dtype=F64)])

    def random_masks(self) -> tuple[torch.Tensor, list[int]]:
        """A mask ``[R, H, width]`` (uneven counts, the special heads of the module doc)
        and a ``P`` per row that holds it."""
        n = [[len(self.candidates(r, h)) for h in range(self.heads)]
             for r in range(self.num_rows)]
        width = max(max(x) for x in n) + self.randint(0, 5)
        mask = torch.zeros(self.num_rows, self.heads, width, dtype=torch.bool)
        for r in range(self.num_rows):
            for h in range(self.heads):
                p = float(torch.rand((), generator=self.gen))
                mask[r, h, : n[r][h]] = torch.rand(n[r][h], generator=self.gen) < p
        h0, h1 = self.randint(0, self.heads - 1), self.randint(0, self.heads - 1)
        mask[0, h0, : n[0][h0]] = True  # keeps every candidate
        if self.num_rows > 1:
            mask[1, h1, : int(self.kept_counts[int(self.slots[1]), h1])] = False  # no page token
        if self.num_rows > 2:
            mask[2, self.randint(0, self.heads - 1)] = False  # keeps nothing
        blocks = []
        for r in range(self.num_rows):
            pages = sum(_cdiv(int(c), BLOCK_SIZE) for c in mask[r].sum(1))
            need = _cdiv(pages, self.heads)
            blocks.append(self.randint(need, max(need, self.p_max[r])))
        return mask, blocks

    def apply(self, mask: torch.Tensor, page_start: torch.Tensor, counts: torch.Tensor,
              tails: torch.Tensor) -> None:
        """The truth after an event with ``mask``, and the returned ranges stored."""
        for r in range(self.num_rows):
            self.cands[r] = [self.candidates(r, h)[mask[r, h, : len(self.candidates(r, h))]]
                             for h in range(self.heads)]
            s = int(self.slots[r])
            self.page_start[s], self.kept_counts[s] = page_start[r], counts[r]
            self.tail_start[r] = int(tails[r])
        self.refresh()

    def event(self, fn, mask: torch.Tensor, blocks: list[int]):
        """``fn`` (a compaction) on the layout's caches."""
        return fn(self.kv[..., : self.dim], self.kv[..., self.dim :], self.page_start,
                  self.kept_counts, self.block_table, self.rows, mask, self.window, blocks)


def _check_attention(lay: Layout, msg: str, group: int = 2) -> None:
    """Head-wise decode of random queries at ``S - 1`` over the layout equals float64
    attention over the truth: each head's candidates (kept head-page tokens, the tail
    before the window), then the window."""
    heads, dim = lay.heads, lay.dim
    query = torch.randn(lay.num_rows, heads * group, dim, dtype=F64, generator=lay.gen)
    rows = row_table(lay.batch_rows, lay.slots, torch.arange(lay.num_rows),
                     torch.arange(1, lay.num_rows + 1), torch.tensor(lay.tail_start),
                     torch.tensor(lay.seq))
    out = torch.zeros_like(query)
    scale = dim ** -0.5
    headwise_attention_ranges_reference(
        query, lay.kv[..., :dim], lay.kv[..., dim:], lay.page_start, lay.kept_counts,
        lay.block_table, rows, lay.num_rows, scale, out)
    for r in range(lay.num_rows):
        for h in range(heads):
            kv = torch.cat([lay.candidates(r, h), lay.win[r][:, h]])
            q = query[r, h * group : (h + 1) * group]
            probs = torch.softmax(q @ kv[:, :dim].T * scale, -1)
            want = probs @ kv[:, dim:]
            torch.testing.assert_close(out[r, h * group : (h + 1) * group], want, atol=1e-9,
                                       rtol=1e-9, msg=f"{msg}, row {r}, head {h}")


def _triton():
    pytest.importorskip("triton")
    from vllm_adakv.kernels.triton_recompact import compact_decode_event_triton

    return compact_decode_event_triton


@pytest.mark.parametrize("heads", [1, 3])
def test_attention_over_the_new_layout(heads):
    seed = _new_seed()
    lay = Layout(seed, heads=heads, num_rows=4)  # row 3: no special head
    mask, blocks = lay.random_masks()
    msg = f"seed {seed}"
    _check_attention(lay, msg + " (before)")
    lay.apply(mask, *lay.event(compact_decode_event_reference, mask, blocks))
    _check_attention(lay, msg)
    for r in range(lay.num_rows):
        assert lay.tail_start[r] == lay.seq[r] - lay.window, msg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_triton_matches_reference(dtype):
    triton_fn = _triton()
    seed = _new_seed()
    lay = Layout(seed, dtype=dtype, num_rows=4)
    mask, blocks = lay.random_masks()
    before = lay.kv.clone()
    want = lay.event(compact_decode_event_reference, mask, blocks)
    want_kv, lay.kv = lay.kv, before
    got = lay.event(triton_fn, mask, blocks)
    for name, g, w in zip(("page_start", "counts", "tail_start"), got, want, strict=True):
        assert g.dtype == torch.int32 and torch.equal(g, w), f"seed {seed}: {name}"
    assert torch.equal(lay.kv.view(torch.uint8), want_kv.view(torch.uint8)), f"seed {seed}"


def test_dispatcher_runs_the_reference_on_cpu():
    seed = _new_seed()
    lay = Layout(seed, num_rows=2)
    mask, blocks = lay.random_masks()
    before = lay.kv.clone()
    want = lay.event(compact_decode_event_reference, mask, blocks)
    want_kv, lay.kv = lay.kv, before
    got = lay.event(compact_decode_event, mask, blocks)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), f"seed {seed}"
    assert torch.equal(lay.kv.view(torch.uint8), want_kv.view(torch.uint8)), f"seed {seed}"


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_two_events_in_a_row(impl):
    fn = compact_decode_event_reference if impl == "reference" else _triton()
    seed = _new_seed()
    steps = 20
    lay = Layout(seed, extra_tokens=steps)
    msg = f"seed {seed}"
    mask, blocks = lay.random_masks()
    lay.apply(mask, *lay.event(fn, mask, blocks))
    _check_attention(lay, msg + " (first event)")
    for r in range(lay.num_rows):  # decode steps: new tokens in the tail
        for p in range(lay.seq[r], lay.seq[r] + steps):
            lay.append(r, p)
        lay.seq[r] += steps
    lay.refresh()
    _check_attention(lay, msg + " (decoding)")
    mask, again = lay.random_masks()
    # P is fixed per request in the engine; here the larger of what the two masks need.
    blocks = [max(a, b) for a, b in zip(blocks, again, strict=True)]
    lay.apply(mask, *lay.event(fn, mask, blocks))
    _check_attention(lay, msg + " (second event)")


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_bad_input_is_refused(impl):
    fn = compact_decode_event_reference if impl == "reference" else _triton()
    seed = _new_seed()
    lay = Layout(seed, num_rows=2)
    mask, blocks = lay.random_masks()
    width = mask.shape[2]
    # A bit past row 0's candidates (every head has fewer than the width).
    n0 = [len(lay.candidates(0, h)) for h in range(lay.heads)]
    wide = torch.cat([mask, torch.zeros(2, lay.heads, 1, dtype=torch.bool)], 2)
    wide[0, 0, n0[0]] = True
    with pytest.raises(ValueError, match="past"):
        lay.event(fn, wide, blocks)
    # A mask narrower than a head's candidates.
    with pytest.raises(ValueError, match="narrower"):
        lay.event(fn, mask[..., : max(n0) - 1], blocks)
    # More pages than P blocks hold.
    full = mask.clone()
    full[0] = torch.arange(width)[None, :] < torch.tensor(n0)[:, None]
    need = _cdiv(sum(_cdiv(n, BLOCK_SIZE) for n in n0), lay.heads)
    if need > 0:
        with pytest.raises(ValueError, match="fit"):
            lay.event(fn, full, [need - 1, blocks[1]])
    # P reaching the window's blocks.
    too_many = (lay.seq[0] - lay.window) // BLOCK_SIZE + 1
    if too_many <= lay.block_table.shape[1]:
        with pytest.raises(ValueError, match="window"):
            lay.event(fn, mask, [too_many, blocks[1]])
    # A tail that does not hold the window.
    lay.tail_start[1] = lay.seq[1] - lay.window + 1
    lay.refresh()
    with pytest.raises(ValueError, match="window"):
        lay.event(fn, mask, blocks)
    lay.tail_start[1] = lay.seq[1] - lay.window
    lay.refresh()
    # Shapes, dtypes, and the pooled layout.
    with pytest.raises(ValueError):
        lay.event(fn, mask[:1], blocks)
    with pytest.raises(ValueError):
        lay.event(fn, mask.int(), blocks)
    with pytest.raises(ValueError):
        lay.event(fn, mask, blocks[:1])
    with pytest.raises(ValueError, match="pooled"):
        fn(lay.kv[..., : lay.dim], lay.kv[..., lay.dim :], lay.page_start, lay.kept_counts,
           lay.block_table, lay.rows, mask, lay.window, blocks,
           chunk_base=torch.zeros(4, 2, dtype=torch.int32))
