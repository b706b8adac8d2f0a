"""Compaction + head-wise decode == dense attention over exactly the kept tokens."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.paged_cache import random_block_tables, write_tokens
from vllm_adakv.kernels import compact_ranges_reference, headwise_attention_ranges_reference
from vllm_adakv.kernels.decode import _packed_pages, row_table


def cpu_layout_caches(nblocks: int, heads: int, bs: int, dim: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logical K/V views in vLLM's CPU layout: each head-page is its keys stored
    transposed (``[D, bs]``) then its values (``[bs, D]``), as ``logical_kv_views`` reads it."""
    kv = torch.randn(nblocks, heads, 2 * bs, dim)
    keys = torch.as_strided(kv, (nblocks, heads, bs, dim), (kv.stride(0), kv.stride(1), 1, bs))
    return keys, kv[:, :, bs:]


def random_keep_mask(heads: int, length: int, window: int) -> torch.Tensor:
    """Uneven per-head kept sets (some heads keep a few, some many), window kept."""
    mask = torch.zeros(heads, length, dtype=torch.bool)
    for h in range(heads):
        n = int(torch.randint(0, length - window + 1, ()).item())
        mask[h, torch.randperm(length - window)[:n]] = True
    mask[:, length - window :] = True
    return mask


def dense_reference(q, keys, values, keep, tail_len, q_positions, length):
    """float64 attention of each query over kept prompt tokens + tail up to its position.

    q: [T, Hq, D]; keys/values: [L + tail_len, H, D]; keep: [H, L]."""
    t, hq, d = q.shape
    h = keys.shape[1]
    g = hq // h
    out = torch.empty(t, hq, d, dtype=torch.float64)
    for i in range(t):
        for qh in range(hq):
            kv = qh // g
            visible = torch.cat([keep[kv], torch.arange(tail_len) + length <= q_positions[i]])
            logits = keys[visible, kv] @ q[i, qh] / d**0.5
            out[i, qh] = torch.softmax(logits, 0) @ values[visible, kv]
    return out


@pytest.mark.parametrize("cpu_layout", [False, True])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("dim", [64, 128])
def test_headwise_decode_equals_dense_over_kept(group, dim, cpu_layout):
    heads, bs, window = 4 if group < 8 else 2, 16, 8
    lengths = [int(x) for x in torch.randint(40, 150, (3,))]
    tails = [int(x) for x in torch.randint(1, 20, (3,))]
    q_lens = [1, int(torch.randint(2, 5, ())), 1]
    tails = [max(t, q) for t, q in zip(tails, q_lens, strict=True)]
    table, nblocks = random_block_tables(
        [n + t for n, t in zip(lengths, tails, strict=True)], bs)
    if cpu_layout:  # the CPU backend's caches: K and V of a head-page read in one gather
        kc, vc = cpu_layout_caches(nblocks, heads, bs, dim)
        assert _packed_pages(kc, vc) is not None
    else:
        kc = torch.randn(nblocks, heads, bs, dim)
        vc = torch.randn(nblocks, heads, bs, dim)
        assert _packed_pages(kc, vc) is None
    originals, masks, starts, counts = [], [], [], []
    for r, (n, t) in enumerate(zip(lengths, tails, strict=True)):
        pos = torch.arange(n)
        k, v = torch.randn(n, heads, dim), torch.randn(n, heads, dim)
        write_tokens(kc, vc, table[r], pos, k, v)
        keep = random_keep_mask(heads, n, window)
        kept_blocks = n // bs  # everything the pages may use (before the tail block)
        need = int(((keep.sum(1) + bs - 1) // bs).sum())
        if need > kept_blocks * heads:
            keep[:, : n - window] = False  # keep only the window: always fits
        st, cnt = compact_ranges_reference(kc, vc, table[r], keep, kept_blocks)
        # tokens generated after compression, in the normal layout
        tp = torch.arange(n, n + t)
        tk, tv = torch.randn(t, heads, dim), torch.randn(t, heads, dim)
        write_tokens(kc, vc, table[r], tp, tk, tv)
        originals.append((torch.cat([k, tk]).double(), torch.cat([v, tv]).double()))
        masks.append(keep)
        starts.append(st)
        counts.append(cnt)
    q = torch.randn(sum(q_lens), heads * group, dim)
    out = torch.full_like(q, float("nan"))
    qsl = torch.tensor([0] + list(torch.cumsum(torch.tensor(q_lens), 0)))
    seq_lens = torch.tensor([n + t for n, t in zip(lengths, tails, strict=True)])
    idx = torch.arange(3)
    rows = row_table(idx, idx, qsl[:-1], qsl[1:], torch.tensor(lengths), seq_lens)
    headwise_attention_ranges_reference(q, kc, vc, torch.stack(starts), torch.stack(counts),
                                        table, rows, sum(q_lens), dim**-0.5, out)
    assert not torch.isnan(out).any()
    for r in range(3):
        s, e = int(qsl[r]), int(qsl[r + 1])
        q_pos = torch.arange(int(seq_lens[r]) - q_lens[r], int(seq_lens[r]))
        want = dense_reference(q[s:e].double(), *originals[r], masks[r], tails[r], q_pos,
                               lengths[r])
        torch.testing.assert_close(out[s:e].double(), want, rtol=1e-4, atol=1e-5)


def test_compaction_rejects_overflow():
    heads, bs, dim = 2, 16, 32
    table, nblocks = random_block_tables([64], bs)
    kc, vc = torch.randn(nblocks, heads, bs, dim), torch.randn(nblocks, heads, bs, dim)
    keep = torch.ones(heads, 64, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="head-pages"):
        compact_ranges_reference(kc, vc, table[0], keep, kept_blocks=2)
