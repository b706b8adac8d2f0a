"""Our logical views of vLLM's CPU KV cache, checked against vLLM's own CPU ops."""

from __future__ import annotations

import pytest
import torch

vllm_ops = pytest.importorskip("vllm._custom_ops")

from tests.kernels.paged_cache import random_block_tables  # noqa: E402
from vllm_adakv.kernels import (  # noqa: E402
    compact_ranges_reference,
    headwise_attention_ranges_reference,
)
from vllm_adakv.kernels.decode import row_table  # noqa: E402
from vllm_adakv.worker.cpu_backend import logical_kv_views  # noqa: E402


def _cache(nblocks, heads, bs, dim, dtype):
    return torch.randn(nblocks, heads, bs, 2 * dim).to(dtype)


@pytest.mark.parametrize("isa", ["vec", "vec16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_views_read_what_vllm_writes(isa, dtype):
    heads, bs, dim, n = 2, 32, 64, 70
    table, nblocks = random_block_tables([n], bs)
    kv_cache = _cache(nblocks, heads, bs, dim, dtype)
    kv = kv_cache.view(nblocks, heads, 2 * bs, dim)
    kc_raw, vc_raw = kv.chunk(2, dim=2)
    k, v = torch.randn(n, heads, dim).to(dtype), torch.randn(n, heads, dim).to(dtype)
    pos = torch.arange(n)
    slots = table[0].long()[pos // bs] * bs + pos % bs
    vllm_ops.cpu_attn_reshape_and_cache(k, v, kc_raw, vc_raw, slots, isa, k_scale=1.0,
                                        v_scale=1.0, kv_cache_dtype="auto")
    key_cache, value_cache = logical_kv_views(kv_cache, isa)
    blocks = table[0].long()[pos // bs]
    assert torch.equal(key_cache[blocks, :, pos % bs], k)
    assert torch.equal(value_cache[blocks, :, pos % bs], v)


def test_unknown_isa_is_a_clear_error():
    with pytest.raises(NotImplementedError, match="amx"):
        logical_kv_views(torch.zeros(2, 1, 32, 64), "amx")


def test_keep_all_compaction_matches_vllm_cpu_kernel():
    """Keep every token: head-wise attention over pages == vLLM's CPU paged attention."""
    heads, group, bs, dim, isa = 2, 4, 32, 64, "vec"
    lengths = [96, 64]  # whole blocks: the pages end where the tail block starts
    table, nblocks = random_block_tables([n + bs for n in lengths], bs)
    kv_cache = _cache(nblocks, heads, bs, dim, torch.float32)
    kv = kv_cache.view(nblocks, heads, 2 * bs, dim)
    kc_raw, vc_raw = kv.chunk(2, dim=2)
    for r, n in enumerate(lengths):
        pos = torch.arange(n + 1)  # prompt + one generated token
        slots = table[r].long()[pos // bs] * bs + pos % bs
        vllm_ops.cpu_attn_reshape_and_cache(
            torch.randn(n + 1, heads, dim), torch.randn(n + 1, heads, dim), kc_raw, vc_raw,
            slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    q = torch.randn(2, heads * group, dim)
    seq_lens = torch.tensor([n + 1 for n in lengths], dtype=torch.int32)
    qsl = torch.tensor([0, 1, 2], dtype=torch.int32)
    meta = vllm_ops.cpu_attn_get_scheduler_metadata(
        num_reqs=2, num_heads=heads * group, num_kv_heads=heads, head_dim=dim,
        seq_lens=seq_lens, dtype=torch.float32, query_start_loc=qsl, causal=True,
        sliding_window_size=-1, isa=isa, enable_kv_split=False)
    want = torch.full_like(q, float("nan"))
    vllm_ops.cpu_attention_with_kv_cache(
        query=q, key_cache=kc_raw, value_cache=vc_raw, output=want, query_start_loc=qsl,
        seq_lens=seq_lens, scale=dim**-0.5, causal=True, alibi_slopes=None, sliding_window=-1,
        block_table=table, softcap=0, scheduler_metadata=meta, s_aux=None)
    key_cache, value_cache = logical_kv_views(kv_cache, isa)
    starts, cnts = [], []
    for r, n in enumerate(lengths):
        keep = torch.ones(heads, n, dtype=torch.bool)
        st, cnt = compact_ranges_reference(key_cache, value_cache, table[r], keep, n // bs)
        starts.append(st)
        cnts.append(cnt)
    got = torch.full_like(q, float("nan"))
    idx = torch.arange(2)
    rows = row_table(idx, idx, qsl[:-1], qsl[1:], torch.tensor(lengths), seq_lens)
    headwise_attention_ranges_reference(q, key_cache, value_cache, torch.stack(starts),
                                        torch.stack(cnts), table, rows, 2, dim**-0.5, got)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
