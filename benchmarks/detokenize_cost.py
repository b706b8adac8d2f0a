"""What vLLM's incremental detokenizer costs per request with a given tokenizer.

    python -m benchmarks.detokenize_cost --model benchmarks/models/llama-3.1-8b

The API server detokenizes every generated token with ``tokenizers``' DecodeStream,
primed with the prompt (``vllm/v1/engine/detokenizer.py``, FastIncrementalDetokenizer).
For each tokenizer (default: the 512-token tiny one the serving benchmark used up to
2026-12-02, and the vocabulary tokenizer of ``benchmarks/vocab_tokenizer.py``) this
primes a stream with a prompt of random ids the tokenizer has, then steps it with output
ids drawn from the *model's* vocabulary, as dummy weights produce them, and reports the
seconds per request and per step (first 50 steps, the rest). Fresh random ids every run
unless ``--seed``. Writes ``detokenize-<machine>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path


def cost(tokenizer_dir: Path, model_vocab: int, prompt_len: int, output_len: int,
         rng: random.Random) -> dict[str, float]:
    """Detokenization time of one request: ``output_len`` steps after a prompt."""
    from tokenizers import Tokenizer
    from tokenizers.decoders import DecodeStream

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    own = tok.get_vocab_size()
    prompt = [rng.randrange(own) for _ in range(prompt_len)]
    stream = DecodeStream(ids=prompt, skip_special_tokens=True)
    times = []
    for _ in range(output_len):
        token = rng.randrange(model_vocab)
        start = time.perf_counter()
        stream.step(tok, token)
        times.append(time.perf_counter() - start)
    head = times[:50]
    tail = times[50:] or [0.0]
    return {"tokenizer": str(tokenizer_dir), "tokenizer_vocab": own,
            "request_s": sum(times), "first50_step_ms": sum(head) / len(head) * 1e3,
            "later_step_ms": sum(tail) / len(tail) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model folder (config.json)")
    ap.add_argument("--tokenizers", nargs="*", type=Path, default=None,
                    help="tokenizer folders (default: the tiny one and the vocabulary one)")
    ap.add_argument("--prompt-len", type=int, default=6000)
    ap.add_argument("--output-len", type=int, default=500)
    ap.add_argument("--requests", type=int, default=3, help="requests per tokenizer")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    model = Path(args.model)
    model_vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    folders = args.tokenizers
    if not folders:
        from adakv_devtools.tiny_model import make_tiny_llama
        from benchmarks.vocab_tokenizer import make_vocab_tokenizer

        tmp = Path(tempfile.gettempdir())
        folders = [make_tiny_llama(tmp / "vllm-adakv-bench-tokenizer"),
                   make_vocab_tokenizer(tmp / "vllm-adakv-vocab-tokenizer" / model.name, model)]
    rng = random.Random(args.seed)
    rows = []
    for folder in folders:
        runs = [cost(folder, model_vocab, args.prompt_len, args.output_len, rng)
                for _ in range(args.requests)]
        row = {**runs[0], **{k: sum(r[k] for r in runs) / len(runs)
                             for k in ("request_s", "first50_step_ms", "later_step_ms")}}
        rows.append(row)
        print(f"{row['tokenizer_vocab']:>7} ids ({folder}): {row['request_s'] * 1e3:8.1f} ms "
              f"per request; {row['first50_step_ms']:.4f} ms a step for the first 50, "
              f"{row['later_step_ms']:.4f} after", flush=True)
    date = dt.date.today().isoformat()
    machine = f"{platform.node() or 'host'}: {platform.processor() or platform.machine()}, " \
              f"{os.cpu_count()} CPU cores"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"detokenize-cpu-{date}.json"
    path.write_text(json.dumps({
        "date": date, "machine": machine,
        "command": "python -m benchmarks.detokenize_cost " + " ".join(sys.argv[1:]),
        "model_vocab": model_vocab, "prompt_len": args.prompt_len,
        "output_len": args.output_len, "requests": args.requests, "results": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
