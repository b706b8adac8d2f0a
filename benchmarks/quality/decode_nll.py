"""Decode-time compression's quality under the full cache and under decode budgets
(issue 29): two tasks on a long *generated* (forced) text.

- ``--task nll`` (rows ``"nll"``): each sample is a stretch of Paul Graham's essays: the
  first ``--prompt`` tokens are the prompt, the next ``--generated`` tokens are forced as
  the output (``forcing.py``), and vLLM returns the model's log-probability of each forced
  token; value = mean NLL per forced token (nats) over the samples.
- ``--task needle`` (rows ``"needle-in-generation"``): the chat-formatted prompt holds
  ``tasks.py``'s needle instructions and essay text, cut at ``--prompt`` tokens; the rest
  of the essay text, with one needle ("One of the special magic numbers for KEY is: N.",
  seeded key, number and depth) somewhere inside the generated part, then the question
  and an answer prefix, are forced: at most ``--generated`` tokens. The model then
  generates ``--answer-tokens`` tokens greedily; correct when N occurs in them. value =
  accuracy. By the time the question is read, every decode event since the needle has
  had to keep it.

The full cache is vanilla vLLM (``--kv-compression none``); each budget ``B`` runs
``--method`` with ``--kv-budget B --kv-decode-budget B`` (the prompt must be longer than
``B``: decode compression applies to requests whose prompt is compressed). Writes
``quality-decode-<model>-<device>-<date>.json`` (``-needle`` before ``.json`` for the
needle task): ``{"model", "date", "command", "machine", "commit", "settings", "rows":
[{"task", "generated", "decode_budget", "n", "value", "full_cache_value"}]}``; the needle
task adds ``"details"`` (every answer).

    python -m benchmarks.quality.decode_nll --model DIR --budgets 128,256,512 \\
        --prompt 1024 --generated 1000 --samples 2
    python -m benchmarks.quality.decode_nll --task needle --model DIR --budgets 128,256 \\
        --prompt 512 --generated 2000 --samples 12
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import current_commit, device_tag, gpu_name
from benchmarks.quality.data import essay_sentences, essays_dir
from benchmarks.quality.engine import run_in_subprocess
from benchmarks.quality.run import decode_answer, end_ids
from benchmarks.quality.tasks import NEEDLE, NIAH_INTRO, Builder, _keys, _number, is_correct

RESULTS = Path(__file__).resolve().parents[1] / "results"
TASK_ROWS = {"nll": "nll", "needle": "needle-in-generation"}
NEEDLE_MARGIN = 8  # tokens between the prompt's end and the earliest needle start


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


def nll_requests(tokenizer: Any, prompt: int, generated: int,
                 samples: int) -> list[dict[str, Any]]:
    """Engine requests of the NLL task: essay stretches, the tail forced, nothing free."""
    texts = essay_stretches(tokenizer, prompt + generated, samples)
    return [{"id": i, "prompt": t[:prompt], "forced": t[prompt:], "max_tokens": 0}
            for i, t in enumerate(texts)]


def needle_request(builder: Builder, prompt: int, generated: int, index: int, seed: int,
                   answer_tokens: int, gap: int) -> dict[str, Any]:
    """One needle-in-generation request (``"id", "prompt", "forced", "max_tokens"``) plus
    its ``"answer"`` (the number) and ``"needle_to_question"`` (forced tokens after the
    needle's last one: the filler before the question, the question, the answer prefix).
    At least ``gap`` filler tokens separate the needle from the question (window +
    interval: a decode event has scored the needle before the question starts)."""
    rng = random.Random(f"needle-in-generation/{prompt}/{generated}/{index}/{seed}")
    key, value = _keys(rng, 1)[0], _number(rng)
    needle = NEEDLE.format(key=key, value=value)
    question = f"What is the special magic number for {key} mentioned in the provided text?"
    answer_prefix = f" The special magic number for {key} mentioned in the provided text is"
    sents = essay_sentences()
    start, depth = rng.randrange(len(sents)), rng.random()
    filler = [sents[(start + i) % len(sents)] for i in range(prompt + generated)]
    head, q_ids = builder.encode(NIAH_INTRO, "", question, answer_prefix)
    # The needle goes at a sentence boundary inside the forced filler, the seeded depth
    # picking among them; positions estimated from per-sentence token counts (checked on
    # the real ids below).
    lo = prompt + NEEDLE_MARGIN
    hi = prompt + generated - len(q_ids) - builder.count(" " + needle) - gap
    bounds, k, pos = [], 0, len(head)
    while pos <= hi:
        if pos >= lo:
            bounds.append(k)
        pos += builder.count(" " + filler[k])
        k += 1
    if not bounds:
        raise ValueError(f"--generated {generated} leaves no sentence boundary for the needle")
    tok = builder.tok
    # From the drawn boundary back towards the prompt: the fit may end the filler early
    # (a long last sentence), leaving fewer than ``gap`` tokens after the needle.
    for at in reversed(bounds[: int(depth * len(bounds)) + 1]):

        def make(n: int, at: int = at) -> tuple[str, str, str, str]:
            sentences = filler[:max(n, at)]
            context = " ".join([*sentences[:at], needle, *sentences[at:]])
            return NIAH_INTRO, context, question, answer_prefix

        prefix_ids, question_ids, _ = builder.fit(prompt + generated, make, len(filler))
        prompt_ids, forced = prefix_ids[:prompt], prefix_ids[prompt:] + question_ids
        if value in tok.decode(prompt_ids) or needle not in tok.decode(forced):
            raise RuntimeError(f"sample {index}: the needle is not inside the forced text")
        first, last = 1, len(forced)  # the shortest forced prefix holding the whole number
        while first < last:
            mid = (first + last) // 2
            first, last = (first, mid) if value in tok.decode(forced[:mid]) else (mid + 1, last)
        if len(forced) - first >= gap + len(question_ids):
            break
    else:
        raise ValueError(f"sample {index}: no needle depth leaves {gap} tokens before the "
                         "question")
    return {"id": index, "prompt": prompt_ids, "forced": forced, "max_tokens": answer_tokens,
            "answer": value, "needle_to_question": len(forced) - first}


def needle_requests(tokenizer: Any, prompt: int, generated: int, samples: int, seed: int,
                    answer_tokens: int, gap: int) -> list[dict[str, Any]]:
    """``samples`` needle-in-generation requests (see ``needle_request``)."""
    builder = Builder(tokenizer)
    return [needle_request(builder, prompt, generated, i, seed, answer_tokens, gap)
            for i in range(samples)]


def needle_answers(tokenizer: Any, result: dict[str, Any],
                   requests: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    """Each request's free answer (cut at the first end-of-turn token) and whether it
    holds the needle's number."""
    stop = end_ids(tokenizer)
    out = []
    for r in requests:
        text = decode_answer(tokenizer, result["outputs"][str(r["id"])], stop)
        out.append((text, is_correct("niah_single", (r["answer"],), text)))
    return out


def write_result(args: argparse.Namespace, argv: list[str] | None,
                 settings: dict[str, Any], rows: list[dict[str, Any]],
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``quality-decode-<model>-<device>-<date>[-needle].json`` (or ``--out``)."""
    model = Path(args.model).name
    date = datetime.date.today().isoformat()
    machine = (gpu_name() or "unknown GPU") if args.device == "cuda" else "cpu"
    out = {"model": model, "date": date, "machine": machine, "commit": current_commit(None),
           "command": "python -m benchmarks.quality.decode_nll " + shlex.join(
               argv if argv is not None else sys.argv[1:]),
           "settings": settings, "rows": rows, **(extra or {})}
    suffix = "" if args.task == "nll" else f"-{args.task}"
    path = args.out or RESULTS / f"quality-decode-{model}-{device_tag(machine)}-{date}{suffix}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(rows, indent=1))
    print(f"wrote {path}")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="nll", choices=sorted(TASK_ROWS))
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--method", default="adakv")
    ap.add_argument("--budgets", default="128,256,512")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--interval", type=int, default=32)
    ap.add_argument("--pool-kernel", type=int, default=None,
                    help="--kv-pool-kernel (default: the plugin's, 7)")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--generated", type=int, default=1000,
                    help="forced tokens (needle: at most this many, question included)")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="needle: keys, numbers, depths")
    ap.add_argument("--answer-tokens", type=int, default=12,
                    help="needle: tokens generated freely after the forced question")
    ap.add_argument("--block-size", type=int, default=None,
                    help="KV block size (default: 32 on the CPU, whose kernel takes "
                         "multiples of 32; 16 on CUDA)")
    ap.add_argument("--kv-space-gib", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    budgets = [int(b) for b in args.budgets.split(",")]
    if max(budgets) >= args.prompt:
        raise SystemExit("every budget must be below --prompt (the prompt must be compressed)")
    if args.task == "nll":
        requests = nll_requests(tokenizer, args.prompt, args.generated, args.samples)
        extra_len = 8
    else:
        requests = needle_requests(tokenizer, args.prompt, args.generated, args.samples,
                                   args.seed, args.answer_tokens,
                                   args.window + args.interval)
        extra_len = args.answer_tokens + 8

    def score(result: dict[str, Any]) -> tuple[float, int]:
        if args.task == "nll":
            return mean_nll(result, args.generated)
        correct = [ok for _, ok in needle_answers(tokenizer, result, requests)]
        return sum(correct) / len(correct), len(correct)

    work = Path(tempfile.mkdtemp(prefix="decode_nll-"))
    engine_requests = [{k: r[k] for k in ("id", "prompt", "forced", "max_tokens")}
                       for r in requests]
    base = {"model": args.model, "device": args.device, "dtype": args.dtype,
            "max_model_len": args.prompt + args.generated + extra_len,
            "requests": engine_requests, "logprobs": args.task == "nll",
            "engine": {"block_size": args.block_size or (32 if args.device == "cpu" else 16)}}
    settings: dict[str, Any] = {"method": args.method, "window": args.window,
                                "interval": args.interval, "prompt": args.prompt}
    if args.pool_kernel:
        settings["pool_kernel"] = args.pool_kernel
    if args.task == "needle":
        settings.update(seed=args.seed, answer_tokens=args.answer_tokens,
                        forced_tokens=[len(r["forced"]) for r in requests])
    task = TASK_ROWS[args.task]
    runs: dict[int, dict[str, Any]] = {}
    out: dict[str, Any] = {}
    for budget in [0, *budgets]:
        comp = None if budget == 0 else {
            "method": args.method, "budget": budget, "window": args.window,
            "decode_budget": budget, "decode_interval": args.interval,
            **({"pool_kernel": args.pool_kernel} if args.pool_kernel else {})}
        t0 = time.perf_counter()
        runs[budget] = run_in_subprocess({**base, "compression": comp}, work,
                                         kv_space_gib=args.kv_space_gib)
        if comp is not None and len(runs[budget]["kept_per_head"]) != len(requests):
            raise RuntimeError(f"budget {budget}: not every request was compressed")
        print(f"budget {budget or 'full'}: {args.task} {score(runs[budget])[0]:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if budget == 0:
            continue
        # Rewritten after every budget: an interrupted run keeps what it measured.
        full, n = score(runs[0])
        done = [b for b in budgets if b in runs]
        rows = [{"task": task, "generated": args.generated, "decode_budget": b, "n": n,
                 "value": score(runs[b])[0], "full_cache_value": full} for b in done]
        extra = None
        if args.task == "needle":
            extra = {"details": [
                {"id": r["id"], "decode_budget": b, "answer": r["answer"],
                 "needle_to_question": r["needle_to_question"], "output": text,
                 "correct": ok}
                for b in [0, *done]
                for r, (text, ok) in zip(requests, needle_answers(tokenizer, runs[b], requests),
                                         strict=True)]}
        out = write_result(args, argv, settings, rows, extra)
    return out


if __name__ == "__main__":
    main()
