"""Kernel micro-benchmarks on a CUDA device (issue: Triton kernels, fast on the H100).

    python -m benchmarks.kernels [--out DIR] [--smoke] [--pooled]

Decode: the head-wise paged kernel (``headwise_attention_ranges_triton``) over
compacted caches vs vLLM's own Triton decode (``unified_attention``, what
TRITON_ATTN runs) over the uncompressed cache of the same requests, Llama-3.1-8B
layer shape (32 query heads, 8 KV heads, d=128, bf16, block size 16), one query
token per request. Keep ratio r: each request keeps ``r * context`` tokens per
KV head on average, split unevenly over heads (as Ada-KV does), plus one tail
token. GB/s counts the K/V bytes of kept tokens (read once); the copy bandwidth
(bytes read + written by a large device-to-device copy) is measured in the same
run. Compress: scoring + Ada-KV selection + compaction of one request's layer vs one
Llama-3.1-8B layer's prefill (QKV/O/MLP matmuls + causal attention) at the same context;
``--kv-scorer expected`` (or ``both``) times the expected scorer's path (its query sums
included) instead of (or beside) the window's. Times are medians of
``triton.testing.do_bench``; with ``--graphs``
the decode calls (ours and vLLM's, on several input sets so repeats do not hit L2) are
captured in one CUDA graph and timed by replay, as the engine runs decode. With
``--decode-balance 4,8`` (and ``--decode-balance-min-iters``) each decode point (and each
``--sweep`` shape) also times our decode with row-balanced splits on the same inputs, and
with ``--decode-launch 4:3:168`` each decode point with those Triton launch settings
(warps:stages[:maxnreg]) (``"ours_variants"``, ``"ours_balance"`` in the files of the first
five H200 leases: one entry per ``"config"``; sweep rows with ``balance_splits``).
``"decode_kernels"`` lists the registers, spills and shared memory of every decode kernel
variant compiled in the run.
With ``--kv-cache-dtype fp8`` the decode caches (ours and vLLM's) are float8_e4m3fn with
per-layer scales, as vLLM's ``--kv-cache-dtype fp8`` gives TRITON_ATTN; GB/s then counts
one byte per element.
With ``--pooled`` (instead of the decode and compress points): the compaction of all
32 layers of R requests at once with head-pages pooled across layers
(``compact_pooled_rows_triton``; per-layer keep shares from a Dirichlet as GVote's are
uneven, mean 1/8 of the prompt) against 32 layers of prefill of the same requests, alone
and queued behind that prefill (``"compress_pooled"`` in the result).
With ``--gvote``: GVote's selection of one layer (voters, their attention, the nucleus
vote under a cap of ``ctx / 8``, the kept masks) of ``rows`` requests, the Triton path
(``voter_probs_triton`` + ``min_mass_above_triton``: keys read in place, each voter's
top-cap only) against the torch path it replaced (per request: gathered keys, dense
softmax, a full sort of every voter's probabilities), both vs that layer's prefill
(``"gvote"`` in the result).
Writes ``kernels-<gpu>-<date>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch
import triton

from benchmarks.machine import current_commit, device_tag
from vllm_adakv.config import KVCompressionConfig
from vllm_adakv.kernels import unrotated_moments
from vllm_adakv.kernels.decode import row_table
from vllm_adakv.kernels.expected import future_moments
from vllm_adakv.kernels.scoring import gather_prompt_keys
from vllm_adakv.kernels.triton_compaction import compact_pooled_rows_triton, compact_rows_triton
from vllm_adakv.kernels.triton_decode import (
    BALANCE_MIN_ITERS,
    _headwise_fwd,
    headwise_attention_ranges_triton,
)
from vllm_adakv.kernels.triton_voting import min_mass_above_triton, voter_probs_triton
from vllm_adakv.kernels.voting import mass_above, voter_softmax
from vllm_adakv.methods import LayerRows, get_method
from vllm_adakv.methods.gvote import gvote_keep_masks, gvote_voters
from vllm_adakv.methods.scorers import FUTURE_POSITIONS

Q_HEADS, KV_HEADS, DIM, BS = 32, 8, 128, 16
HIDDEN, FFN = 4096, 14336
DTYPE = torch.bfloat16
PROFILE = False
# --kv-cache-dtype fp8: decode caches in float8_e4m3fn with per-layer scales, as vLLM's
# TRITON_ATTN views its uint8 fp8 cache (queries and outputs stay bf16).
CACHE_DTYPE = DTYPE
K_SCALE, V_SCALE = 0.37, 1.9


def bench(fn, rep: int = 200) -> float:
    """Median time in microseconds (``rep`` milliseconds of repeats)."""
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e3


def copy_bandwidth_gbs() -> float:
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (t * 1e-6) / 1e9


def uneven_counts(batch: int, ctx: int, keep: float) -> torch.Tensor:
    """Kept tokens per (request, head): mean ``keep * ctx``, uneven over heads."""
    if keep >= 1.0:
        return torch.full((batch, KV_HEADS), ctx, dtype=torch.int64)
    weights = torch.distributions.Dirichlet(torch.ones(KV_HEADS)).sample((batch,))
    counts = (weights * KV_HEADS * keep * ctx).round().long()
    return counts.clamp(1, ctx)


def decode_inputs(batch: int, ctx: int, keep: float) -> dict:
    """Caches, tables and queries of one decode point (compressed and uncompressed views)."""
    blocks_per_row = ctx // BS + 1  # the prompt, then the tail block of the new token
    num_blocks = batch * blocks_per_row + 1
    kv = torch.randn(num_blocks, KV_HEADS, BS, 2 * DIM, device="cuda", dtype=DTYPE)
    kv = kv.to(CACHE_DTYPE)
    table = (torch.randperm(num_blocks - 1, device="cuda") + 1).int().view(batch, -1)
    # Ours: head h owns the pages after those of heads < h, in the row's own blocks.
    counts = uneven_counts(batch, ctx, keep)
    pages = (counts + BS - 1) // BS
    idx = torch.arange(batch)
    return {
        "kv": kv, "table": table,
        "query": torch.randn(batch, Q_HEADS, DIM, device="cuda", dtype=DTYPE),
        "starts": (pages.cumsum(1) - pages).int().cuda(),
        "rows": row_table(idx, idx, idx, idx + 1, torch.full((batch,), ctx),
                          torch.full((batch,), ctx + 1)).cuda(),
        "counts": counts.int().cuda(),
        # Pooled-format tables as the engine passes them: one layer's pages in chunk 0.
        "chunk_base": torch.zeros(batch, 32, dtype=torch.int32, device="cuda"),
        "capacity": pages.sum(1).clamp(min=1).int().cuda(),
        "kept_bytes": (int(counts.sum()) + batch * KV_HEADS) * DIM * 2 * kv.element_size(),
    }


def ours_decode(x: dict, **config):
    """A closure running our head-wise decode on ``decode_inputs``' tensors (``config``:
    options of ``headwise_attention_ranges_triton``; ``chunk_tables=True`` passes the
    pooled-format tables)."""
    kv, query = x["kv"], x["query"]
    out = torch.empty_like(query)
    config = dict(config)
    if kv.dtype != query.dtype:  # fp8: the layer's scales, on the device
        config.update(k_scale=torch.tensor([K_SCALE], device="cuda"),
                      v_scale=torch.tensor([V_SCALE], device="cuda"))
    if config.pop("chunk_tables", False):  # the engine's pooled-format tables
        config.update(chunk_base=x["chunk_base"], capacity=x["capacity"])
    return lambda: headwise_attention_ranges_triton(
        query, kv[..., :DIM], kv[..., DIM:], x["starts"], x["counts"], x["table"], x["rows"],
        query.shape[0], DIM**-0.5, out, **config)


def vllm_decode(x: dict, ctx: int):
    """A closure running vLLM's TRITON_ATTN decode on the uncompressed cache."""
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention

    kv, query, table = x["kv"], x["query"], x["table"]
    batch = query.shape[0]
    seq = torch.full((batch,), ctx + 1, dtype=torch.int32, device="cuda")
    qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    k_view, v_view = kv.transpose(1, 2).split(DIM, dim=-1)  # its [nb, bs, H, D] views
    segments = 16
    threshold = 128 // KV_HEADS
    seg_out = torch.empty(threshold, Q_HEADS, segments, DIM, device="cuda", dtype=torch.float32)
    seg_max = torch.empty(threshold, Q_HEADS, segments, device="cuda", dtype=torch.float32)
    seg_sum = torch.empty_like(seg_max)
    descale = torch.ones(1, device="cuda", dtype=torch.float32).expand(batch, KV_HEADS)
    k_descale, v_descale = descale, descale
    if kv.dtype != query.dtype:  # fp8 cache: TRITON_ATTN's descales are the layer's scales
        k_descale, v_descale = K_SCALE * descale, V_SCALE * descale
    out_v = torch.empty_like(query)
    return lambda: unified_attention(
        q=query, k=k_view, v=v_view, out=out_v, cu_seqlens_q=qsl, max_seqlen_q=1,
        seqused_k=seq, max_seqlen_k=ctx + 1, softmax_scale=DIM**-0.5, causal=True,
        window_size=(-1, -1), block_table=table, softcap=0, q_descale=None,
        k_descale=k_descale, v_descale=v_descale, seq_threshold_3D=threshold,
        num_par_softmax_segments=segments, softmax_segm_output=seg_out,
        softmax_segm_max=seg_max, softmax_segm_expsum=seg_sum)


def bench_graph(fns: list) -> float:
    """Median microseconds per call of ``fns`` captured back to back in one CUDA graph
    (as the engine's decode replays them: no host launch time in the number)."""
    for fn in fns:  # compile and warm up outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    return bench(graph.replay) / len(fns)


def same_traffic_copy_us(traffic_bytes: int, buffers: int) -> float:
    """Microseconds of a device-to-device copy moving ``traffic_bytes`` (read + written),
    timed in a CUDA graph over ``buffers`` source/destination pairs like the decode."""
    n = max(1, traffic_bytes // 2)
    pairs = [(torch.empty(n, dtype=torch.uint8, device="cuda").random_(),
              torch.empty(n, dtype=torch.uint8, device="cuda")) for _ in range(buffers)]
    return bench_graph([lambda s=src, d=dst: d.copy_(s) for src, dst in pairs])


def graph_copies(batch: int, ctx: int, keep: float) -> int:
    """Input sets per graph: enough that the kept bytes read exceed ~200 MB (4x the H200's
    L2) where memory allows, so repeats do not measure the cache; at most 32."""
    kept = batch * KV_HEADS * (keep * ctx + 1) * DIM * 2 * DTYPE.itemsize
    full = (batch * (ctx // BS + 1) + 1) * KV_HEADS * BS * 2 * DIM * DTYPE.itemsize
    return int(max(1, min(32, -(-200e6 // kept), 20e9 // full)))


def balance_configs(splits: str, min_iters: str) -> list[dict]:
    """Balanced-split decode options from two comma lists (every pair)."""
    return [{"balance_splits": int(b), "balance_min_iters": int(m)}
            for b in splits.split(",") if b for m in min_iters.split(",") if m]


def launch_configs(spec: str) -> list[dict]:
    """Decode options overriding Triton's launch settings, from a comma list of
    ``warps:stages`` or ``warps:stages:maxnreg``."""
    configs = []
    for item in filter(None, spec.split(",")):
        fields = [int(f) for f in item.split(":")]
        if len(fields) not in (2, 3):
            raise ValueError(f"--decode-launch wants warps:stages[:maxnreg], got {item!r}")
        launch = {"num_warps": fields[0], "num_stages": fields[1]}
        if len(fields) == 3:
            launch["maxnreg"] = fields[2]
        configs.append({"launch": launch})
    return configs


def option_configs(spec: str) -> list[dict]:
    """Decode options from a JSON list of option dicts of
    ``headwise_attention_ranges_triton`` (e.g. ``[{"num_splits": 2, "pages_per_iter": 4}]``)."""
    if not spec:
        return []
    configs = json.loads(spec)
    if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
        raise ValueError(f"--decode-variants wants a JSON list of objects, got {spec!r}")
    return configs


def decode_grid(spec: str) -> tuple[list[int], list[int], list[float]]:
    """(batches, contexts, keep ratios) from ``"B,B;C,C;K,K"``."""
    parts = spec.split(";")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"--decode-grid wants 'batches;contexts;keeps', got {spec!r}")
    return ([int(b) for b in parts[0].split(",")], [int(c) for c in parts[1].split(",")],
            [float(k) for k in parts[2].split(",")])


def variant_label(config: dict) -> str:
    """A short name of a decode variant for the printed table."""
    if set(config) == {"balance_splits", "balance_min_iters"}:
        return f"balance{config['balance_splits']}/{config['balance_min_iters']}"
    if set(config) == {"launch"}:
        return "launch" + ":".join(str(v) for v in config["launch"].values())
    return json.dumps(config, separators=(",", ":"))


def compiled_kernel_resources(fn) -> list[dict]:
    """Registers per thread, spills and shared memory of each variant of the Triton
    kernel ``fn`` compiled so far (what bounds its programs per SM)."""
    rows = []
    for entry in getattr(fn, "device_caches", {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        for kernel in getattr(cache, "values", list)():
            meta = kernel.metadata
            rows.append({"num_warps": meta.num_warps, "num_stages": meta.num_stages,
                         "maxnreg": getattr(meta, "maxnreg", None), "shared": meta.shared,
                         "n_regs": getattr(kernel, "n_regs", None),
                         "n_spills": getattr(kernel, "n_spills", None),
                         "hash": meta.hash[:12]})
    return rows


def decode_point(batch: int, ctx: int, keep: float, graphs: bool = False,
                 chunked: bool = False, variants: list[dict] | tuple = ()) -> dict:
    """One decode point; with ``chunked``, also with the pooled-format chunk tables the
    engine passes (``ours_chunked_us``); with ``variants`` (options of
    ``headwise_attention_ranges_triton``), also with each of those (``ours_variants``:
    [{"config", "us", "gbs"}]); timed the same way on the same inputs."""
    x = decode_inputs(batch, ctx, keep)
    sets = [x]
    if graphs:
        sets += [decode_inputs(batch, ctx, keep) for _ in
                 range(graph_copies(batch, ctx, keep) - 1)]

    def timed(fns: list) -> float:
        return bench_graph(fns) if graphs else bench(fns[0])

    ours = timed([ours_decode(s) for s in sets])
    vllm_us = timed([vllm_decode(s, ctx) for s in sets])
    chunked_us = timed([ours_decode(s, chunk_base=s["chunk_base"], capacity=s["capacity"])
                        for s in sets]) if chunked else None
    variant_us = [(cfg, timed([ours_decode(s, **cfg) for s in sets])) for cfg in variants]
    kept_bytes = sum(s["kept_bytes"] for s in sets) / len(sets)
    copy_us = same_traffic_copy_us(int(kept_bytes), len(sets)) if graphs else None
    point = {"batch": batch, "context": ctx, "keep_ratio": keep, "ours_us": ours,
             "vllm_triton_us": vllm_us, "ours_gbs": kept_bytes / (ours * 1e-6) / 1e9,
             "kept_bytes": kept_bytes, "timing": "cuda_graph" if graphs else "launches",
             "input_sets": len(sets)}
    if copy_us is not None:
        # The floor at this size: a device copy moving the same bytes (half read, half
        # written), in a graph over as many buffers; what fixed costs leave of copy speed.
        point["same_traffic_copy_us"] = copy_us
        point["ours_vs_same_traffic_copy"] = copy_us / ours
    if chunked_us is not None:
        point["ours_chunked_us"] = chunked_us
    if variant_us:
        point["ours_variants"] = [{"config": cfg, "us": t, "gbs": kept_bytes / (t * 1e-6) / 1e9}
                                  for cfg, t in variant_us]
    return point


SWEEP_SHAPES = [(32, 2048, 1.0), (32, 8192, 1.0), (32, 2048, 1 / 16), (128, 8192, 1.0),
                (256, 32768, 1.0), (256, 32768, 1 / 16), (1, 32768, 1.0), (32, 8192, 1 / 4),
                (128, 8192, 1 / 4)]


def sweep_configs(balance: list[dict] | tuple = ()) -> list[dict]:
    """The sweep's decode options: split counts x tiles x launch settings, and the given
    balanced-split options."""
    def launch(warps: int, stages: int) -> dict:
        return {"num_warps": warps, "num_stages": stages}

    configs = [{"num_splits": splits, "pages_per_iter": pages, "launch": launch(w, s)}
               for splits in (1, 2, 4, 8, 16) for pages in (2, 4, 8)
               for w, s in ((4, 2), (4, 3), (8, 2))]
    configs += [{"num_splits": None, **option, "pages_per_iter": 8, "launch": launch(w, s)}
                for option in balance for w, s in ((4, 3), (8, 2))]
    return configs


def decode_sweep(copy_bw: float, balance: list[dict] | tuple = ()) -> list[dict]:
    """Time launch configurations of our decode on a few shapes (to set the defaults);
    ``balance``: also those balanced-split options (rows with ``balance_splits``)."""
    rows = []
    for batch, ctx, keep in SWEEP_SHAPES:
        x = decode_inputs(batch, ctx, keep)
        base = {"batch": batch, "context": ctx, "keep_ratio": keep,
                "vllm_triton_us": bench(vllm_decode(x, ctx)), "default_us": bench(ours_decode(x))}
        for cfg in sweep_configs(balance):
            t = bench(ours_decode(x, **cfg), rep=40)
            rows.append({**base, **cfg, "us": t,
                         "pct_of_copy_bw": 100 * x["kept_bytes"] / (t * 1e-6) / 1e9 / copy_bw})
        best = min((r for r in rows if r["batch"] == batch and r["context"] == ctx
                    and r["keep_ratio"] == keep), key=lambda r: r["us"])
        print(f"sweep {batch}x{ctx} keep {keep:.3f}: default {base['default_us']:.1f} us, "
              f"vllm {base['vllm_triton_us']:.1f} us, best {best['us']:.1f} us "
              f"({best['pct_of_copy_bw']:.0f}% copy) with splits {best['num_splits']} "
              f"balance {best.get('balance_splits')}/{best.get('balance_min_iters')} "
              f"pages {best['pages_per_iter']} {best['launch']}", flush=True)
        del x
        torch.cuda.empty_cache()
    return rows


def prefill_layer(ctx: int, rows: int = 1):
    """A closure running one Llama-3.1-8B layer's prefill of ``rows`` prompts of ``ctx``
    tokens: matmuls over all their tokens + each prompt's causal attention."""
    x = torch.randn(rows * ctx, HIDDEN, device="cuda", dtype=DTYPE)
    w_qkv = torch.randn(HIDDEN, (Q_HEADS + 2 * KV_HEADS) * DIM, device="cuda", dtype=DTYPE)
    w_o = torch.randn(HIDDEN, HIDDEN, device="cuda", dtype=DTYPE)
    w_up = torch.randn(HIDDEN, 2 * FFN, device="cuda", dtype=DTYPE)
    w_down = torch.randn(FFN, HIDDEN, device="cuda", dtype=DTYPE)
    q = torch.randn(rows, Q_HEADS, ctx, DIM, device="cuda", dtype=DTYPE)
    k = torch.randn(rows, KV_HEADS, ctx, DIM, device="cuda", dtype=DTYPE)

    def layer():
        x @ w_qkv
        torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True,
                                                         enable_gqa=True)
        x @ w_o
        h = x @ w_up
        h[:, :FFN] @ w_down

    return layer


def queued_after_us(layer, work, t_layer: float) -> float:
    """Microseconds ``work`` adds when queued right behind ``layer`` (timed alone at
    ``t_layer``). As in the engine: the compression's launches queue behind the layer's
    prefill, so only what the GPU cannot overlap (or the host cannot launch in time)
    counts."""

    def both():
        layer()
        work()

    return bench(both) - t_layer


def compress_point(ctx: int, ratio: int = 8, window: int = 32, rows: int = 1,
                   scorer: str = "window") -> dict:
    """Scoring + Ada-KV selection + compaction of one layer of ``rows`` requests of ``ctx``
    tokens (one launch set, as the backend runs every request whose prompt completes in a
    step) against that layer's prefill of the same requests, through the method's own
    ``keep_masks``. ``scorer="expected"`` adds what that scorer costs the layer: the moments
    of the prompt queries rotated back (``kernels.unrotated_moments``, one chunk per
    prompt), the Gaussian moved to the positions to come (``future_moments``), then its
    scoring (``kernels.score_expected``) instead of the window's."""
    per_row = ctx // BS + 2
    kv = torch.randn(rows * per_row + 1, KV_HEADS, BS, 2 * DIM, device="cuda", dtype=DTYPE)
    key_cache, value_cache = kv[..., :DIM], kv[..., DIM:]
    table = (torch.randperm(rows * per_row, device="cuda") + 1).int().view(rows, per_row)
    wq = torch.randn(rows, window, Q_HEADS, DIM, device="cuda", dtype=DTYPE)
    # The step's packed q/k/v rows: the backend's queries are a strided view of them.
    qkv = torch.randn(rows * ctx, Q_HEADS + 2 * KV_HEADS, DIM, device="cuda", dtype=DTYPE)
    angles = torch.arange(ctx + 1024, device="cuda", dtype=torch.float32)[:, None] * \
        torch.logspace(0, -4, DIM // 2, device="cuda")[None]
    cos_sin = torch.cat((angles.cos(), angles.sin()), -1).contiguous()
    positions = torch.arange(ctx, device="cuda")
    budget = ctx // ratio
    kept_blocks = min(ctx // BS, -(-(KV_HEADS * budget + KV_HEADS * (BS - 1)) // BS))
    block_rows, lengths = list(range(rows)), [ctx] * rows
    cfg = KVCompressionConfig(method="adakv", window=window, scorer=scorer)
    method = get_method("adakv")

    def compress():
        future = covariances = None
        if scorer == "expected":
            moments = [future_moments(*unrotated_moments(
                qkv[r * ctx:(r + 1) * ctx, :Q_HEADS], positions, cos_sin, DIM, True), ctx,
                ctx, FUTURE_POSITIONS, cos_sin, DIM, True) for r in range(rows)]
            future = torch.stack([m[0] for m in moments])[:, None]
            covariances = torch.stack([m[1] for m in moments])
        masks = method.keep_masks(LayerRows(
            cfg=cfg, layer_idx=0, prompt_lens=lengths, budgets=[budget] * rows,
            key_cache=key_cache, block_table=table, rows=block_rows, scale=DIM**-0.5,
            window_queries=wq, future_queries=future, future_covariances=covariances))
        compact_rows_triton(key_cache, value_cache, table, block_rows, masks,
                            [kept_blocks] * rows)

    t_compress = bench(compress)
    if PROFILE and ctx == 8192 and rows == 1:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                compress()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40))
    layer = prefill_layer(ctx, rows)
    t_layer = bench(layer)
    t_in_stream = queued_after_us(layer, compress, t_layer)
    return {"context": ctx, "rows": rows, "scorer": scorer, "prefill_layer_us": t_layer,
            "compress_us": t_compress, "overhead_pct": 100 * t_compress / t_layer,
            "compress_in_stream_us": t_in_stream,
            "overhead_in_stream_pct": 100 * t_in_stream / t_layer, "ratio": ratio}


def gvote_point(ctx: int, rows: int = 1, ratio: int = 8, window: int = 32, samples: int = 8,
                p: float = 0.95) -> dict:
    """GVote's selection of one layer of ``rows`` requests of ``ctx`` tokens, capped at
    ``ctx / ratio`` tokens per head: Triton path vs the torch path it replaced, against
    that layer's prefill."""
    per_row = ctx // BS + 2
    key_cache = torch.randn(rows * per_row + 1, KV_HEADS, BS, DIM, device="cuda", dtype=DTYPE)
    table = (torch.randperm(rows * per_row, device="cuda") + 1).int().view(rows, per_row)
    wq = torch.randn(rows, window, Q_HEADS, DIM, device="cuda", dtype=DTYPE) * 2
    block_rows, lengths, caps = list(range(rows)), [ctx] * rows, [ctx // ratio] * rows
    kw = dict(window=window, nucleus_p=p, max_keeps=caps, pool_kernel=7)
    stages = {}

    def triton_path(stage: str = ""):
        voters = gvote_voters(wq, samples, 0, 5)
        probs = voter_probs_triton(voters, key_cache, table, block_rows, lengths, DIM**-0.5)
        if stage == "probs":
            return
        vote = min_mass_above_triton(probs, lengths, p, max(caps))
        if stage == "mass":
            return
        return gvote_keep_masks(vote, lengths, **kw)

    def torch_path():
        out = []
        for r in range(rows):
            keys = gather_prompt_keys(key_cache, table[r], ctx)
            voters = gvote_voters(wq[r : r + 1], samples, 0, 5)[0]
            vote = mass_above(voter_softmax(voters, keys, DIM**-0.5)).amin(1)
            out.append(gvote_keep_masks(vote[None], [ctx], **{**kw, "max_keeps": caps[:1]}))
        return out

    fast, slow = triton_path(), torch.cat(torch_path())
    differ, kept = int((fast != slow).sum()), int(slow.sum())
    t_triton, t_torch = bench(triton_path), bench(torch_path)
    for stage in ("probs", "mass"):
        stages[stage] = bench(lambda stage=stage: triton_path(stage))
    layer = prefill_layer(ctx, rows)
    t_layer = bench(layer)
    t_in_stream = queued_after_us(layer, triton_path, t_layer)
    return {"context": ctx, "rows": rows, "cap_ratio": ratio, "samples": samples, "p": p,
            "prefill_layer_us": t_layer, "triton_us": t_triton, "torch_us": t_torch,
            "triton_probs_us": stages["probs"], "triton_probs_mass_us": stages["mass"],
            "overhead_pct": 100 * t_triton / t_layer,
            "torch_overhead_pct": 100 * t_torch / t_layer,
            "triton_in_stream_us": t_in_stream,
            "overhead_in_stream_pct": 100 * t_in_stream / t_layer,
            "masks_differ": differ, "kept": kept}


POOL_LAYERS = 32


def pooled_keep_masks(rows: int, ctx: int, ratio: int, layers: int = POOL_LAYERS,
                      window: int = 32) -> torch.Tensor:
    """``[rows, layers, H, ctx]`` keep masks, mean ``ctx / ratio`` kept tokens per (layer,
    head), uneven over layers (shares of the budget from a flat Dirichlet, as GVote's
    per-layer counts are) and over heads; the last ``window`` positions always kept."""
    shares = torch.distributions.Dirichlet(torch.ones(layers)).sample((rows,))  # [R, K]
    rates = shares * layers / ratio
    rates = rates[:, :, None] * (0.5 + torch.rand(rows, layers, KV_HEADS))
    rates = rates.clamp(max=1.0).to("cuda")
    masks = torch.rand(rows, layers, KV_HEADS, ctx, device="cuda") < rates[..., None]
    masks[..., ctx - window :] = True
    return masks


def paired_overhead_us(base, both, pairs: int = 7) -> tuple[float, float]:
    """(median us of ``base``, median over back-to-back pairs of ``both`` - ``base``), timed
    with CUDA events; for calls too long for ``bench`` to repeat often."""
    base()
    both()
    torch.cuda.synchronize()
    times, diffs = [], []
    for i in range(pairs):
        got = {}
        for name, fn in ((("base", base), ("both", both)) if i % 2 == 0
                         else (("both", both), ("base", base))):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            got[name] = start.elapsed_time(end) * 1e3
        times.append(got["base"])
        diffs.append(got["both"] - got["base"])
    return float(torch.tensor(times).median()), float(torch.tensor(diffs).median())


def compress_pooled_point(ctx: int, rows: int, ratio: int = 8, planned: bool = False
                          ) -> dict:
    """Compaction of all ``POOL_LAYERS`` layers of ``rows`` requests of ``ctx`` tokens in one
    call (head-pages pooled across the layers' tensors of one buffer, layers at shuffled
    block offsets) against that many layers' prefill of the same requests. ``planned``:
    the plan gives each request's kept blocks (else the kernel derives the fewest)."""
    per_row = ctx // BS + 2
    layer_blocks = rows * per_row + 1
    kv = torch.randn(POOL_LAYERS * layer_blocks, KV_HEADS, BS, 2 * DIM, device="cuda",
                     dtype=DTYPE)
    key_cache, value_cache = kv[..., :DIM], kv[..., DIM:]
    table = (torch.randperm(rows * per_row, device="cuda") + 1).int().view(rows, per_row)
    layer_bases = (torch.randperm(POOL_LAYERS) * layer_blocks).int().cuda()
    masks = pooled_keep_masks(rows, ctx, ratio)
    pages = (masks.sum(3) + BS - 1) // BS
    need = [max(1, -(-int(p.sum()) // (POOL_LAYERS * KV_HEADS))) for p in pages]
    kept_blocks = need if planned else [None] * rows
    block_rows = list(range(rows))

    def compress():
        compact_pooled_rows_triton(key_cache, value_cache, table, block_rows, masks,
                                   layer_bases, kept_blocks)

    t_compress = bench(compress)
    layer = prefill_layer(ctx, rows)

    def prefill():
        for _ in range(POOL_LAYERS):
            layer()

    def prefill_then_compress():
        prefill()
        compress()

    # As in the engine: the group's compaction queues behind its layers' prefill. The
    # prefill takes 0.2-1 s, so the difference is taken pair by pair (the two timed back
    # to back, alternating), its median over the pairs.
    t_prefill, t_in_stream = paired_overhead_us(prefill, prefill_then_compress)
    kept = int(masks.sum())
    return {"context": ctx, "rows": rows, "layers": POOL_LAYERS, "ratio": ratio,
            "planned_kept_blocks": planned, "kept_blocks": need,
            "kept_tokens_per_layer_head": kept / (rows * POOL_LAYERS * KV_HEADS),
            "max_layer_share": float((pages.sum(2).float() / pages.sum((1, 2))[:, None]
                                      .float()).max()),
            "prefill_layers_us": t_prefill, "compress_us": t_compress,
            "overhead_pct": 100 * t_compress / t_prefill,
            "compress_in_stream_us": t_in_stream,
            "overhead_in_stream_pct": 100 * t_in_stream / t_prefill,
            "moved_gbs": 2 * kept * DIM * 2 * DTYPE.itemsize / (t_compress * 1e-6) / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--smoke", action="store_true", help="one small point of each (quick check)")
    ap.add_argument("--decode-grid", default="",
                    help="batches;contexts;keep ratios of the decode grid, e.g. "
                         "'32,128;2048,8192;1,0.0625' (default: the issue's grid)")
    ap.add_argument("--profile", action="store_true", help="profile one compression at 8k")
    ap.add_argument("--compress-only", action="store_true")
    ap.add_argument("--sweep", action="store_true",
                    help="time decode launch configurations on a few shapes")
    ap.add_argument("--graphs", action="store_true",
                    help="time decode inside CUDA graphs (no host launch time), ours and vLLM's")
    ap.add_argument("--suffix", default="", help="appended to the result file's name")
    ap.add_argument("--chunk-tables", action="store_true",
                    help="also time decode with the pooled-format chunk tables")
    ap.add_argument("--decode-balance", default="",
                    help="comma list of grid splits: also time decode (grid and --sweep) "
                         "with row-balanced splits over that many")
    ap.add_argument("--decode-balance-min-iters", default=str(BALANCE_MIN_ITERS),
                    help="comma list: the balanced splits' minimum iterations per split "
                         "(every pair with --decode-balance is timed)")
    ap.add_argument("--decode-launch", default="",
                    help="comma list of warps:stages[:maxnreg]: also time each decode point "
                         "with those Triton launch settings")
    ap.add_argument("--decode-variants", default="",
                    help='JSON list of decode option dicts, e.g. \'[{"num_splits": 2}]\': '
                         "also time each decode point with each")
    ap.add_argument("--pooled", action="store_true",
                    help="only the all-layers pooled compaction vs 32 layers of prefill")
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                    help="decode points only: fp8 = float8_e4m3fn caches with scales (what "
                         "vLLM's --kv-cache-dtype fp8 gives TRITON_ATTN) for ours and vLLM's")
    ap.add_argument("--kv-scorer", choices=["window", "expected", "both"], default="window",
                    help="scorer(s) of the compress points (both: each context twice)")
    ap.add_argument("--gvote", action="store_true",
                    help="only GVote's selection (Triton vs torch) vs one layer's prefill")
    args = ap.parse_args()
    balance = balance_configs(args.decode_balance, args.decode_balance_min_iters)
    variants = balance + launch_configs(args.decode_launch) + option_configs(args.decode_variants)
    global PROFILE, CACHE_DTYPE
    PROFILE = args.profile
    if args.kv_cache_dtype == "fp8":
        CACHE_DTYPE = torch.float8_e4m3fn
    gpu = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth_gbs()
    batches, contexts, keeps = [1, 32, 128, 256], [2048, 8192, 32768], [1.0, 0.25, 1 / 16]
    if args.smoke:
        batches, contexts, keeps = [32], [2048], [1.0, 1 / 16]
    if args.decode_grid:
        batches, contexts, keeps = decode_grid(args.decode_grid)
    if args.compress_only or args.sweep or args.pooled or args.gvote:
        batches = []
    decode = []
    for ctx in contexts:
        for batch in batches:
            for keep in keeps:
                point = decode_point(batch, ctx, keep, graphs=args.graphs,
                                     chunked=args.chunk_tables, variants=variants)
                point["pct_of_copy_bw"] = 100 * point["ours_gbs"] / copy_bw
                for entry in point.get("ours_variants", []):
                    entry["pct_of_copy_bw"] = 100 * entry["gbs"] / copy_bw
                decode.append(point)
                torch.cuda.empty_cache()
                print(json.dumps(point), flush=True)
    sweep = decode_sweep(copy_bw, balance) if args.sweep else []
    scorers = ["window", "expected"] if args.kv_scorer == "both" else [args.kv_scorer]
    compress = [] if args.sweep or args.graphs or args.pooled or args.gvote else [
        compress_point(ctx, scorer=sc) for ctx in ([2048] if args.smoke else contexts)
        for sc in scorers]
    if not (args.sweep or args.smoke or args.graphs or args.pooled or args.gvote):
        # A 16k-token prefill step holding 8 prompts of 2k: all compressed in one launch set.
        compress.extend(compress_point(2048, rows=8, scorer=sc) for sc in scorers)
    date = dt.date.today().isoformat()
    tag = device_tag(gpu)
    result = {"gpu": gpu, "date": date, "commit": current_commit(None),
              "command": " ".join(["python -m benchmarks.kernels", *sys.argv[1:]]),
              "torch": torch.__version__, "triton": triton.__version__,
              "copy_bandwidth_gbs": copy_bw, "kv_cache_dtype": args.kv_cache_dtype,
              "decode_cache_dtype": str(CACHE_DTYPE), "decode": decode, "compress": compress}
    if sweep:
        result["decode_sweep"] = sweep
    if decode or sweep:
        result["decode_kernels"] = compiled_kernel_resources(_headwise_fwd)
        for k in result["decode_kernels"]:
            print("decode kernel", json.dumps(k))
    pooled = []
    if args.pooled:
        points = [(2048, 1, False)] if args.smoke else [
            (8192, 1, False), (8192, 4, False), (8192, 4, True), (2048, 8, False)]
        for ctx, rows, planned in points:
            pooled.append(compress_pooled_point(ctx, rows, planned=planned))
            torch.cuda.empty_cache()
            print(json.dumps(pooled[-1]), flush=True)
        result["compress_pooled"] = pooled
    gvote = []
    if args.gvote:
        points = [(2048, 1)] if args.smoke else [(2048, 1), (8192, 1), (32768, 1), (2048, 8)]
        for ctx, rows in points:
            gvote.append(gvote_point(ctx, rows))
            torch.cuda.empty_cache()
            print(json.dumps(gvote[-1]), flush=True)
        result["gvote"] = gvote
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"kernels-{tag}-{date}{args.suffix}.json").write_text(json.dumps(result, indent=1))
    print(f"copy bandwidth {copy_bw:.0f} GB/s")
    print(f"{'batch':>5} {'ctx':>6} {'keep':>6} {'ours_us':>9} {'vllm_us':>9} {'x_vllm':>7} "
          f"{'GB/s':>6} {'%copy':>6}")
    for p in decode:
        print(f"{p['batch']:>5} {p['context']:>6} {p['keep_ratio']:>6.3f} {p['ours_us']:>9.1f} "
              f"{p['vllm_triton_us']:>9.1f} {p['ours_us'] / p['vllm_triton_us']:>7.3f} "
              f"{p['ours_gbs']:>6.0f} {p['pct_of_copy_bw']:>6.1f}"
              + (f" chunked={p['ours_chunked_us']:.1f}" if "ours_chunked_us" in p else "")
              + (f" copy={p['same_traffic_copy_us']:.1f}" if "same_traffic_copy_us" in p
                 else "")
              + "".join(f" {variant_label(e['config'])}={e['us']:.1f}"
                        for e in p.get("ours_variants", [])))
    for c in compress:
        print(f"compress {c['rows']} x ctx {c['context']} ({c['scorer']} scorer): "
              f"{c['compress_us']:.0f} us vs layer "
              f"prefill {c['prefill_layer_us']:.0f} us = {c['overhead_pct']:.1f}%; queued after "
              f"the layer: +{c['compress_in_stream_us']:.0f} us = "
              f"{c['overhead_in_stream_pct']:.1f}%")
    for c in pooled:
        print(f"compress pooled {c['layers']} layers x {c['rows']} x ctx {c['context']}"
              f"{' (planned)' if c['planned_kept_blocks'] else ''}: {c['compress_us']:.0f} us "
              f"vs prefill {c['prefill_layers_us']:.0f} us = {c['overhead_pct']:.2f}%; queued "
              f"after the prefill: +{c['compress_in_stream_us']:.0f} us = "
              f"{c['overhead_in_stream_pct']:.2f}%")

    for c in gvote:
        print(f"gvote {c['rows']} x ctx {c['context']} (cap 1/{c['cap_ratio']}): triton "
              f"{c['triton_us']:.0f} us ({c['overhead_pct']:.1f}% of the layer; queued after "
              f"it +{c['triton_in_stream_us']:.0f} us = {c['overhead_in_stream_pct']:.1f}%), "
              f"torch {c['torch_us']:.0f} us ({c['torch_overhead_pct']:.1f}%); masks differ at "
              f"{c['masks_differ']} of {c['kept']} kept")


if __name__ == "__main__":
    main()
