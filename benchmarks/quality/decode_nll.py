"""Decode-time compression's quality: per-token negative log-likelihood of a long forced
text under the full cache and under decode budgets (issue 29, task "nll").

Each sample is a stretch of Paul Graham's essays: the first ``--prompt`` tokens are the
prompt, the next ``--generated`` tokens are forced as the output (``forcing.py``), and
vLLM returns the model's log-probability of each forced token. The full cache is
vanilla vLLM (``--kv-compression none``); each budget ``B`` runs ``--method`` with
``--kv-budget B --kv-decode-budget B`` (the prompt must be longer than ``B``: decode
compression applies to requests whose prompt is compressed). Writes
``quality-decode-<model>-<device>-<date>.json``: ``{"model", "date", "command", "machine",
"commit", "rows": [{"task": "nll", "generated", "decode_budget", "n", "value",
"full_cache_value"}]}``, value = mean NLL per forced token (nats) over the samples.

    python -m benchmarks.quality.decode_nll --model DIR --budgets 128,256,512 \\
        --prompt 1024 --generated 1000 --samples 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import current_commit, device_tag, gpu_name
from benchmarks.quality.data import essays_dir
from benchmarks.quality.engine import run_in_subprocess

RESULTS = Path(__file__).resolve().parents[1] / "results"


def essay_stretches(tokenizer: Any, length: int, samples: int) -> list[list[int]]:
    """``samples`` disjoint stretches of ``length`` tokens of the essays, in file order."""
    ids: list[int] = []
    out: list[list[int]] = []
    for path in sorted(essays_dir().glob("*.txt")):
        ids += tokenizer.encode(path.read_text(), add_special_tokens=False)
        while len(ids) >= length and len(out) < samples:
            out.append(ids[:length])
            ids = ids[length:]
        if len(out) == samples:
            return out
    raise ValueError(f"the essays hold fewer than {samples} stretches of {length} tokens")


def mean_nll(result: dict[str, Any], generated: int) -> tuple[float, int]:
    """Mean NLL per forced token over the requests of one engine run, and the sample count."""
    values = [-sum(lp[:generated]) / generated for lp in result["logprobs"].values()]
    return sum(values) / len(values), len(values)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--method", default="adakv")
    ap.add_argument("--budgets", default="128,256,512")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--interval", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--generated", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=None,
                    help="KV block size (default: 32 on the CPU, whose kernel takes "
                         "multiples of 32; 16 on CUDA)")
    ap.add_argument("--kv-space-gib", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = essay_stretches(tokenizer, args.prompt + args.generated, args.samples)
    requests = [{"id": i, "prompt": t[: args.prompt], "forced": t[args.prompt:],
                 "max_tokens": 0} for i, t in enumerate(texts)]
    budgets = [int(b) for b in args.budgets.split(",")]
    if max(budgets) >= args.prompt:
        raise SystemExit("every budget must be below --prompt (the prompt must be compressed)")
    work = Path(tempfile.mkdtemp(prefix="decode_nll-"))
    base = {"model": args.model, "device": args.device, "dtype": args.dtype,
            "max_model_len": args.prompt + args.generated + 8, "requests": requests,
            "logprobs": True, "engine": {"block_size": args.block_size or (
                32 if args.device == "cpu" else 16)}}
    runs: dict[int, dict[str, Any]] = {}
    for budget in [0, *budgets]:
        comp = None if budget == 0 else {
            "method": args.method, "budget": budget, "window": args.window,
            "decode_budget": budget, "decode_interval": args.interval}
        t0 = time.perf_counter()
        runs[budget] = run_in_subprocess({**base, "compression": comp}, work,
                                         kv_space_gib=args.kv_space_gib)
        if comp is not None and len(runs[budget]["kept_per_head"]) != len(requests):
            raise RuntimeError(f"budget {budget}: not every request was compressed")
        print(f"budget {budget or 'full'}: NLL {mean_nll(runs[budget], args.generated)[0]:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    full, n = mean_nll(runs[0], args.generated)
    rows = [{"task": "nll", "generated": args.generated, "decode_budget": b, "n": n,
             "value": mean_nll(runs[b], args.generated)[0], "full_cache_value": full}
            for b in budgets]
    model = Path(args.model).name
    date = datetime.date.today().isoformat()
    machine = (gpu_name() or "unknown GPU") if args.device == "cuda" else "cpu"
    out = {"model": model, "date": date, "machine": machine, "commit": current_commit(None),
           "command": "python -m benchmarks.quality.decode_nll " + shlex.join(
               argv if argv is not None else sys.argv[1:]),
           "settings": {"method": args.method, "window": args.window,
                        "interval": args.interval, "prompt": args.prompt},
           "rows": rows}
    path = args.out or RESULTS / f"quality-decode-{model}-{device_tag(machine)}-{date}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(rows, indent=1))
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
