"""Where GVote's vote spends its time on a CUDA device (one request, one layer).

    python -m benchmarks.gvote_probe [--out DIR]

Llama-3.1-8B layer shape (32 query heads, 8 KV heads, d=128), bf16 paged cache, S = 8
synthetic queries, contexts 2k/8k/32k. Times ``voter_probs_triton`` with the float32
voters dotted at each Triton ``input_precision`` (ieee: CUDA-core FMAs; tf32x3: three
TF32 tensor-core products; tf32: one) and with bf16 voters, at the default and at 32
position splits, with the largest relative difference of the probabilities from ieee;
then the top-cap lists (cap = ctx / 8) and ``_min_mass_above``. Writes
``kernels-<gpu>-<date>-gvote-probe.json`` (measured on an H200 2026-12-01: ieee took
1.0 / 2.8 / 10.9 ms, tf32x3 0.18 / 0.13 / 0.46 ms at 1e-5 relative, hence the default).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch
import triton

from benchmarks.machine import device_tag
from vllm_adakv.kernels.triton_voting import min_mass_above_triton, voter_probs_triton
from vllm_adakv.kernels.voting import top_mass_lists
from vllm_adakv.methods.gvote import gvote_voters


def bench(fn) -> float:
    """Median microseconds."""
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median") * 1e3


def probe(ctx: int) -> dict:
    per_row = ctx // 16 + 2
    kc = torch.randn(per_row + 1, 8, 16, 128, device="cuda", dtype=torch.bfloat16)
    table = (torch.randperm(per_row, device="cuda") + 1).int().view(1, per_row)
    wq = torch.randn(1, 32, 32, 128, device="cuda", dtype=torch.bfloat16) * 2
    voters = gvote_voters(wq, 8, 0, 5)
    row = {"ctx": ctx, "voters_us": bench(lambda: gvote_voters(wq, 8, 0, 5))}
    ref = None
    for name, v, precision in [("fp32_ieee", voters, "ieee"), ("fp32_tf32x3", voters, "tf32x3"),
                               ("fp32_tf32", voters, "tf32"), ("bf16", voters.bfloat16(), "ieee")]:
        for splits in (None, 32):
            def run(v=v, precision=precision, splits=splits):
                return voter_probs_triton(v, kc, table, [0], [ctx], 128**-0.5,
                                          precision=precision, num_splits=splits)

            out = run()
            ref = out if ref is None else ref
            row[f"{name}_s{splits}_us"] = bench(run)
            row[f"{name}_maxrel"] = float(((out - ref).abs() / ref.clamp(min=1e-30)).max())
    cap = ctx // 8
    row["topk_us"] = bench(lambda: top_mass_lists(ref, cap))
    row["mass_us"] = bench(lambda: min_mass_above_triton(ref, [ctx], 0.95, cap))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    rows = []
    for ctx in (2048, 8192, 32768):
        rows.append(probe(ctx))
        print(json.dumps(rows[-1]), flush=True)
    gpu = torch.cuda.get_device_name()
    tag = device_tag(gpu)
    date = dt.date.today().isoformat()
    result = {"gpu": gpu, "date": date,
              "command": " ".join(["python -m benchmarks.gvote_probe", *sys.argv[1:]]),
              "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"kernels-{tag}-{date}-gvote-probe.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
