"""GPU time of one decode event's Triton kernels at real sizes (issue 29).

The events are ``tests/gpu/decode_event_layout.build_event``'s random ones (Llama-3.1-8B
layer: 8 KV heads, 32 query heads, d=128, bf16, block 16; per head up to 1000 head-page
tokens and a tail of 100-400 tokens before the window of 32). Per size, the median over
``--reps`` launches (CUDA events) of: the candidate scores (``score_decode_event``), Ada-KV's
per-head safeguard on the event's top hits (``safeguard_caps_heads``), the compaction into
head-pages (``compact_decode_event``, on a fresh copy of the cache each time) and GVote's
voter probabilities (8 voters per query head, ``decode_voter_probs``); and, for scale, one
decode step of the same rows (``headwise_attention_ranges``, one query each).

    python -m benchmarks.decode_event_kernels
    (writes results/kernels-<gpu>-<date>-decode-event.json)
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.machine import current_commit, device_tag, gpu_name
from tests.gpu.decode_event_layout import build_event, topk_hits, window_queries
from vllm_adakv import kernels
from vllm_adakv.kernels.triton_decode import headwise_attention_ranges_triton

RESULTS = Path(__file__).resolve().parent / "results"
Q_HEADS = 32


def median_us(fn: Callable[[], object], reps: int, before: Callable[[], object] | None = None
              ) -> float:
    """Median GPU time of ``fn`` in microseconds (``before`` runs untimed first)."""
    times = []
    for i in range(reps + 2):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= 2:  # the first launches compile
            times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def measure(num_rows: int, seq: tuple[int, int], reps: int) -> dict[str, float]:
    ev = build_event(1234 + num_rows, "cuda", num_rows=num_rows, seq=seq)
    scale = ev.dim**-0.5
    q = window_queries(ev, Q_HEADS, ev.window)
    voters = window_queries(ev, Q_HEADS, 8, salt=2)
    args = (ev.keys, ev.page_start, ev.kept_counts, ev.block_table, ev.rows)
    out: dict[str, float] = {}
    scores = kernels.score_decode_event(q, *args, ev.width, scale, gqa_reduce="mean",
                                        pooling="max", pool_kernel=7)
    out["score_us"] = median_us(lambda: kernels.score_decode_event(
        q, *args, ev.width, scale, gqa_reduce="mean", pooling="max", pool_kernel=7), reps)
    counts = ev.counts.to("cuda")
    totals = [int(c.sum()) // 2 for c in ev.counts]
    hits = topk_hits(scores, counts, totals)
    total_t = torch.tensor(totals, device="cuda")
    out["safeguard_us"] = median_us(lambda: kernels.safeguard_caps_heads(
        hits, total_t, 0.2, counts), reps)
    keep = torch.arange(ev.width, device="cuda") < (counts[..., None] // 2)  # half of each
    blocks = ev.p_max
    copy = ev.kv.clone()
    out["compact_us"] = median_us(
        lambda: kernels.compact_decode_event(copy[..., : ev.dim], copy[..., ev.dim:],
                                             *args, keep, ev.window, blocks),
        reps, before=lambda: copy.copy_(ev.kv))
    out["voter_probs_us"] = median_us(lambda: kernels.decode_voter_probs(
        voters, *args, ev.window, ev.width, scale), reps)
    out["event_us"] = out["score_us"] + out["safeguard_us"] + out["compact_us"]
    step_q = window_queries(ev, Q_HEADS, 1, salt=3)[:, 0]
    rows = ev.rows.clone()
    rows[:, 2] = torch.arange(num_rows, device=rows.device)
    rows[:, 3] = rows[:, 2] + 1
    rows[:, 6] = rows[:, 2]
    output = torch.empty_like(step_q)
    out["decode_step_us"] = median_us(lambda: headwise_attention_ranges_triton(
        step_q, ev.keys, ev.values, ev.page_start, ev.kept_counts, ev.block_table, rows,
        1, scale, output), reps)
    out["candidates_mean"] = float(ev.counts.float().mean())
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="4x8192,16x8192,64x8192,16x2048")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    machine = gpu_name() or "unknown GPU"
    rows = []
    for size in args.sizes.split(","):
        r, s = (int(x) for x in size.split("x"))
        got = measure(r, (max(1024, s // 2), s), args.reps)
        rows.append({"rows": r, "seq_max": s, **got})
        print(json.dumps(rows[-1]), flush=True)
    date = datetime.date.today().isoformat()
    out = {"command": "python -m benchmarks.decode_event_kernels " + shlex.join(
        argv if argv is not None else sys.argv[1:]), "machine": machine,
        "commit": current_commit(None), "date": date, "rows": rows}
    path = args.out or RESULTS / f"kernels-{device_tag(machine)}-{date}-decode-event.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
