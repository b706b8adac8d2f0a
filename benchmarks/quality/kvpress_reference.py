"""An independent reference: NVIDIA's kvpress (HF transformers, CPU) on the harness's prompts.

Question-agnostic only. Each sample's context (``prefix_ids``: the prompt our
``agnostic`` mode sends, see ``run.requests_for``) is prefilled under a kvpress press,
which compresses every layer's cache in its forward hooks; then the question
(``question_ids``: the tokens our agnostic mode forces) is fed at the next positions and
greedy decoding follows, as kvpress's pipeline does when the question is passed apart
from the context. Generation runs ``max_tokens`` steps whatever comes (``ignore_eos`` in
our engine) and answers are cut at the first end-of-turn token and scored with
``tasks.is_correct``, as in ``run.py``.

Methods: ``none`` (full cache), ``kvpress-expected`` (``ExpectedAttentionPress``, its
defaults), ``kvpress-snapkv`` (``SnapKVPress``, window ``--window``, average pooling
over ``--kernel``), ``kvpress-adakv`` (``AdaKVPress`` around that ``SnapKVPress``,
safeguard ``--alpha``). Ratio ``r`` at context ``c`` keeps ``c // r`` tokens per (layer,
KV head), window included, as our budget does: the press's ``compression_ratio`` (the
fraction removed) is set per sample so that kvpress keeps exactly that many;
``--plain-ratio`` passes ``1 - 1/r`` instead (0.5, 0.75), which keeps that share of the
context itself.

kvpress pins transformers < 5.3, so this runs in its own virtualenv, outside the
repository, and never imports vLLM or ``vllm_adakv``::

    python3.11 -m venv /work/kvpress-venv
    /work/kvpress-venv/bin/pip install "torch==2.13.0+cpu"   # a CPU wheel, installed first
    /work/kvpress-venv/bin/pip install kvpress==0.5.5 wonderwords==3.0.1
    /work/kvpress-venv/bin/python -m benchmarks.quality.kvpress_reference \\
        --model ~/.cache/vllm-adakv/models/Qwen2.5-Coder-0.5B-Instruct \\
        --contexts 2048,4096 --samples 6 --ratios 2,4

(the full sweep: 6 tasks x 6 samples x 2 contexts, 7 runs per sample, 504 prefills:
about 14 hours on two CPU cores shared with CI, fp32; see README "kvpress reference").
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from .engine import REPO
from .run import _csv, build_samples, cell_requests, decode_answer, end_ids, plan_cells, score_cell
from .tasks import TASKS

MODE = "agnostic"
PRESSES = ("kvpress-expected", "kvpress-snapkv", "kvpress-adakv")
DEFAULT_METHODS = ",".join(("none", *PRESSES))


def press_inputs(request: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(context ids, question ids) of one agnostic request: what is compressed, what is
    asked after."""
    return list(request["prompt"]), list(request["forced"])


def removed_fraction(budget: int, context_len: int) -> float:
    """kvpress ``compression_ratio`` keeping ``budget`` of ``context_len`` tokens: it keeps
    ``int(context_len * (1 - ratio))``, so aim half a token above the budget."""
    if budget >= context_len:
        return 0.0
    return 1.0 - (budget + 0.5) / context_len


def make_press(method: str, ratio: float, window: int, kernel: int, alpha: float):
    """The kvpress press of a method label (``None`` for ``none``)."""
    from kvpress import AdaKVPress, ExpectedAttentionPress, SnapKVPress

    if method == "none":
        return None
    if method == "kvpress-expected":
        return ExpectedAttentionPress(compression_ratio=ratio)
    snap = SnapKVPress(compression_ratio=ratio, window_size=window, kernel_size=kernel)
    if method == "kvpress-snapkv":
        return snap
    if method == "kvpress-adakv":
        return AdaKVPress(snap, alpha_safeguard=alpha)
    raise ValueError(f"unknown method {method!r}; known: none,{','.join(PRESSES)}")


def kept_per_head(model, cache) -> float:
    """Mean kept context tokens per (layer, KV head) after the prefill: the cache length,
    less the keys that AdaKVPress masks per head (it keeps the tensors whole)."""
    kept = []
    for layer, block in zip(cache.layers, model.model.layers, strict=True):
        heads, length = layer.keys.shape[1], layer.keys.shape[2]
        masked = getattr(block.self_attn, "masked_key_indices", None)
        kept.append(length - (0 if masked is None else len(masked[0]) / heads))
    return sum(kept) / len(kept)


def generate(model, press, context: list[int], question: list[int],
             max_tokens: int) -> tuple[list[int], float]:
    """Greedy ids after ``question`` (``max_tokens`` of them), the context compressed by
    ``press`` before the question is read; and the kept tokens per (layer, KV head)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    device = model.device
    with torch.inference_mode():
        with press(model) if press is not None else nullcontext():
            model.model(input_ids=torch.tensor([context], device=device),
                        past_key_values=cache)
        kept = kept_per_head(model, cache)
        step, pos, out = torch.tensor([question], device=device), len(context), []
        for _ in range(max_tokens):
            positions = torch.arange(pos, pos + step.shape[1], device=device).unsqueeze(0)
            logits = model(input_ids=step, past_key_values=cache, position_ids=positions,
                           logits_to_keep=1).logits
            out.append(int(logits[0, -1].argmax()))
            pos += step.shape[1]
            step = torch.tensor([[out[-1]]], device=device)
    return out, kept


def reference_version() -> str:
    from importlib.metadata import version

    return f"kvpress {version('kvpress')}, transformers {version('transformers')}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality.kvpress_reference",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model folder (prepare_model)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--attn", default="sdpa", help="attn_implementation (AdaKVPress: not eager)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--contexts", default="2048,4096")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--samples", type=int, default=6, help="samples per task and context")
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--ratios", default="2,4")
    ap.add_argument("--plain-ratio", action="store_true",
                    help="compression_ratio = 1 - 1/r of each context, not our budget c // r")
    ap.add_argument("--window", type=int, default=32, help="SnapKV observation window")
    ap.add_argument("--kernel", type=int, default=7, help="SnapKV pooling kernel")
    ap.add_argument("--alpha", type=float, default=0.2, help="AdaKV safeguard")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--notes", default="")
    ap.add_argument("--out", default=None, help="JSON path")
    args = ap.parse_args(argv)

    os.environ["HF_HUB_OFFLINE"] = "1"  # a local folder only, never the hub
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model).expanduser().resolve()
    contexts, ratios = _csv(args.contexts, int), _csv(args.ratios, int)
    tasks, methods = _csv(args.tasks), _csv(args.methods)
    for t in tasks:
        if t not in TASKS:
            ap.error(f"unknown task {t}; known: {','.join(TASKS)}")
    for m in methods:
        if m != "none" and m not in PRESSES:
            ap.error(f"unknown method {m}; known: none,{','.join(PRESSES)}")
    date = dt.date.today().isoformat()
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / \
        f"quality-{model_dir.name}-kvpress-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.quality.kvpress_reference " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    reference = reference_version()

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    stop = end_ids(tok)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=getattr(torch, args.dtype), attn_implementation=args.attn,
        local_files_only=True).to(args.device).eval()
    load_s = time.perf_counter() - t0
    samples = build_samples(tok, tasks, contexts, args.samples, args.seed)
    cells = plan_cells(methods, contexts, ratios, args.window)
    rows: list[dict[str, Any]] = []
    details: list[dict[str, Any]] = []
    timings: list[dict[str, Any]] = []

    def save(complete: bool) -> None:
        result = {"model": model_dir.name, "date": date, "command": command,
                  "notes": args.notes, "complete": complete, "reference": reference,
                  "device": args.device, "gpu": gpu, "dtype": args.dtype,
                  "attn_implementation": args.attn,
                  "threads": torch.get_num_threads(), "host": platform.node(),
                  "window": args.window, "kernel": args.kernel, "alpha": args.alpha,
                  "seed": args.seed, "plain_ratio": args.plain_ratio,
                  "load_s": round(load_s, 1), "rows": rows, "cells": timings,
                  "details": details}
        out.write_text(json.dumps(result, indent=1) + "\n")

    for cell, pairs in cells.items():
        answers: dict[str, str] = {}
        kept: dict[str, float] = {}
        ratios_used: dict[str, float] = {}
        seconds: dict[str, float] = {}
        t_cell = time.perf_counter()
        for (c, r) in pairs:
            for req in cell_requests([(c, r)], tasks, samples, [MODE]):
                context, question = press_inputs(req)
                ratio = 0.0 if cell.budget is None else (
                    1.0 - 1.0 / r if args.plain_ratio else removed_fraction(cell.budget,
                                                                            len(context)))
                press = make_press(cell.method, ratio, args.window, args.kernel, args.alpha)
                t_req = time.perf_counter()
                ids, kept_tokens = generate(model, press, context, question, req["max_tokens"])
                answers[req["id"]] = decode_answer(tok, ids, stop)
                if press is not None:
                    kept[req["id"]] = kept_tokens
                ratios_used[req["id"]] = ratio
                seconds[req["id"]] = round(time.perf_counter() - t_req, 1)
                print(f"{cell.method} {cell.budget} {req['id']}: "
                      f"{seconds[req['id']]}s kept {kept_tokens:.0f}/"
                      f"{len(context)} {answers[req['id']]!r}", file=sys.stderr, flush=True)
        cell_rows, cell_details = score_cell(cell, pairs, tasks, [MODE], samples, answers, kept)
        rows.extend({**row, "reference": reference} for row in cell_rows)
        for d in cell_details:
            rid = f"{d['task']}/{d['context']}/{d['index']}/{MODE}"
            details.append({**d, "compression_ratio": ratios_used[rid], "seconds": seconds[rid]})
        timings.append({"method": cell.method, "budget": cell.budget,
                        "requests": len(ratios_used),
                        "total_s": round(time.perf_counter() - t_cell, 1)})
        save(complete=False)
    save(complete=True)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
