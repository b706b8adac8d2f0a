"""What prefill-only compression can reach where KV memory binds: a step-level model.

    python -m benchmarks.schedule_model --from-run benchmarks/results/throughput-...json

Replays the throughput benchmark's workload (N prompts of L tokens arriving at once,
``output_len`` tokens each) through a simplified vLLM schedule: each step takes up to
``--step-tokens`` tokens (running requests first: one token per decoding request, the
rest of a prompt being prefilled), admits waiting prompts while their first chunk fits
in the free blocks (plus, with ``--reserve``, the blocks compressed running requests
still need for their whole output, as ``--kv-reserve-output`` does), and preempts the
newest request when a step overflows. A request holds ``ceil(computed / bs)`` blocks
while prefilling, then ``kept + ceil(generated / bs)`` once compressed. Step costs come
from the measured run: ``wall(prefill-only) / prompt tokens`` per token of a step with
prompt tokens, the median decode-only step time otherwise. The model has no overheads of
its own (no compression cost, no scheduling gaps): its wall time is what the schedule
allows. Writes ``schedule-model-<run>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from pathlib import Path

from vllm_adakv.config import KVCompressionConfig
from vllm_adakv.memory import plan_compression


def simulate(num_prompts: int, input_len: int, output_len: int, kept_blocks: int | None,
             capacity: int, block_size: int, step_tokens: int, token_s: float,
             decode_s: float, reserve: bool, max_seqs: int = 256,
             mixed_fixed_s: float = 0.0) -> dict:
    """Wall time, steps and peak concurrency of the modelled schedule.

    ``kept_blocks`` None: no compression (a request keeps its whole prompt). A step with
    prompt tokens costs ``mixed_fixed_s + token_s * tokens`` (its fixed part matters
    for small ``step_tokens``)."""
    base = input_len // block_size if kept_blocks is None else kept_blocks
    computed = [0] * num_prompts
    generated = [0] * num_prompts
    waiting = list(range(num_prompts))
    running: list[int] = []

    def blocks(i: int) -> int:
        if computed[i] < input_len:
            return math.ceil(computed[i] / block_size)
        return base + math.ceil(generated[i] / block_size)

    def still_needed(i: int) -> int:
        return base + math.ceil(output_len / block_size) - blocks(i)

    wall, steps, decode_steps, peak, preemptions = 0.0, 0, 0, 0, 0
    while waiting or running:
        budget = step_tokens
        work = []
        for i in running:
            take = min(input_len - computed[i], budget) if computed[i] < input_len else 1
            if take:
                work.append((i, take))
                budget -= take
        used = sum(blocks(i) for i in running)
        while waiting and budget > 0 and len(running) < max_seqs:
            i = waiting[0]
            held = sum(still_needed(j) for j in running if computed[j] >= input_len) \
                if reserve else 0
            take = min(input_len, budget)
            if used + math.ceil(take / block_size) + held > capacity:
                break
            waiting.pop(0)
            running.append(i)
            work.append((i, take))
            budget -= take
            used += math.ceil(take / block_size)
        prompt_tokens = sum(t for i, t in work if computed[i] < input_len)
        decode_rows = sum(1 for i, _ in work if computed[i] >= input_len)
        for i, take in work:
            if computed[i] < input_len:
                computed[i] += take
                generated[i] = 1 if computed[i] == input_len else 0
            else:
                generated[i] += 1
        while sum(blocks(i) for i in running) > capacity:
            victim = running.pop()
            computed[victim] = generated[victim] = 0
            waiting.insert(0, victim)
            preemptions += 1
        peak = max(peak, len(running))
        running = [i for i in running if generated[i] < output_len]
        steps += 1
        if prompt_tokens:
            wall += mixed_fixed_s + token_s * (prompt_tokens + decode_rows)
        else:
            wall += decode_s
            decode_steps += 1
    return {"wall_s": wall, "steps": steps, "decode_steps": decode_steps,
            "peak_concurrency": peak, "preemptions": preemptions}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from-run", type=Path, required=True,
                    help="a throughput-*.json of benchmarks.throughput (costs and workload)")
    ap.add_argument("--step-tokens", type=int, default=16384,
                    help="vLLM's max_num_batched_tokens of that run")
    ap.add_argument("--mixed-fixed-ms", type=float, default=0.0,
                    help="fixed cost of a step with prompt tokens (try the decode step's)")
    ap.add_argument("--kv-heads", type=int, default=8, help="KV heads of the model shape")
    ap.add_argument("--layers", type=int, default=32, help="layers of the model shape")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--suffix", default="", help="appended to the result file's name")
    args = ap.parse_args()
    run = json.loads(args.from_run.read_text())
    points = run["points"]
    first = points[0]
    n, length, out_len = first["num_prompts"], first["input_len"], first["output_len"]
    van, pre = run["vanilla"], run["prefill_only"]
    capacity, bs = van["kv_blocks_total"], van["block_size"]
    token_s = pre["wall_s"] / (n * length)
    decode_s = van["decode_step_ms_median"] / 1e3
    common = dict(num_prompts=n, input_len=length, output_len=out_len, capacity=capacity,
                  block_size=bs, step_tokens=args.step_tokens, token_s=token_s,
                  decode_s=decode_s, mixed_fixed_s=args.mixed_fixed_ms / 1e3)
    vanilla = simulate(kept_blocks=None, reserve=False, **common)
    rows = []
    for p in points:
        plan = plan_compression(KVCompressionConfig(method=p["method"], budget=p["budget"]),
                                length, args.kv_heads, bs, args.layers)
        if plan is None:
            continue
        kept = plan.kept_blocks
        model = simulate(kept_blocks=kept, reserve=p.get("reserve_output", 0) > 0, **common)
        rows.append({"ratio": p["ratio"], "kept_blocks": kept, "model": model,
                     "model_speedup": vanilla["wall_s"] / model["wall_s"],
                     "measured_wall_s": p["wall_s"], "measured_speedup": p["speedup"]})
    result = {"command": " ".join(["python -m benchmarks.schedule_model", *sys.argv[1:]]),
              "date": dt.date.today().isoformat(), "run": str(args.from_run),
              "run_date": run.get("date"), "gpu": run["gpu"], "token_s": token_s,
              "decode_step_s": decode_s, "step_tokens": args.step_tokens,
              "mixed_fixed_s": args.mixed_fixed_ms / 1e3, "vanilla_model": vanilla,
              "vanilla_measured_wall_s": van["wall_s"], "points": rows}
    out = Path(args.out) / f"schedule-model-{args.from_run.stem}{args.suffix}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"vanilla: model {vanilla['wall_s']:.1f} s, measured {van['wall_s']:.1f} s")
    for r in rows:
        print(f"{r['ratio']}x: model {r['model']['wall_s']:.1f} s ({r['model_speedup']:.2f}x, "
              f"{r['model']['decode_steps']} decode steps), measured {r['measured_wall_s']:.1f}"
              f" s ({r['measured_speedup']:.2f}x)")
    print(out)


if __name__ == "__main__":
    main()
