"""Same engine, two source trees: does a change move end-to-end throughput?

Runs one ``benchmarks.throughput`` engine spec (default: regime B, 64 x 6000 in / 500
out, 8 GiB of KV, Ada-KV at 8x) alternately from two checkouts of this repository
(``--before DIR`` and the current one), ``--repeats`` times each, every run in a fresh
process that imports that tree's package; writes the JSON (command, machine, commits,
date, every run, after/before ratio of the medians) to ``--out``.

    python -m benchmarks.compare_trees --model benchmarks/models/llama-3.1-8b \
        --before .gpu/before --out $OUT
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def run(tree: Path, spec: dict) -> dict:
    """One engine run from ``tree`` (its package first on the path)."""
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if p and Path(p).resolve() != HERE]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0",
               PYTHONPATH=os.pathsep.join([str(tree), *rest]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--engine",
                           json.dumps(spec)], cwd=tree, env=env, capture_output=True,
                          text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("@@POINTS@@"):
            return json.loads(line[len("@@POINTS@@"):])[0]
    return {"error": proc.stderr[-3000:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--before", required=True, help="checkout of the earlier tree")
    ap.add_argument("--ratio", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--commit-before", default="", help="recorded in the result")
    ap.add_argument("--commit-after", default="", help="recorded in the result")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    before = Path(args.before).resolve()
    model = str(Path(args.model).resolve())
    budget = 6000 // args.ratio
    spec = {"model": model, "input_len": 6000, "output_len": 500, "num_prompts": 64,
            "kv_cache_gib": 8, "tp": 1, "dtype": "bfloat16", "engine": {},
            "method": "adakv", "reserve_output": 500, "budget": budget,
            "max_num_seqs": 256, "points": [{"max_tokens": 500, "budget": budget}]}
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for i in range(args.repeats):
        for name, tree in (("after", HERE), ("before", before)) if i % 2 == 0 else (
                ("before", before), ("after", HERE)):
            res = run(tree, spec)
            runs[name].append(res)
            print(name, json.dumps({k: res.get(k) for k in ("wall_s", "out_tok_s", "error")
                                    if k in res})[:400], flush=True)
    import torch

    walls = {k: [r["wall_s"] for r in v if "wall_s" in r] for k, v in runs.items()}
    ratio = (statistics.median(walls["before"]) / statistics.median(walls["after"])
             if walls["before"] and walls["after"] else None)
    result = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "date": dt.date.today().isoformat(),
              "command": "python -m benchmarks.compare_trees " + " ".join(sys.argv[1:]),
              "commit_after": args.commit_after, "commit_before": args.commit_before,
              "spec": spec,
              "runs": runs, "wall_s_median": {k: statistics.median(v) if v else None
                                             for k, v in walls.items()},
              "speed_after_over_before": ratio}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"compare-trees-{result['date']}-B6000-{args.ratio}x.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"after/before speed {ratio}; wrote {path}")


if __name__ == "__main__":
    main()
