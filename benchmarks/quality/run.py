"""Answer quality under KV compression: RULER-style tasks through vLLM.

    python -m benchmarks.quality.run --model DIR --device cpu --contexts 2048,4096 \\
        --tasks niah_single,niah_multikey --samples 4 --methods none,snapkv,adakv \\
        --ratios 2,4,8 [--modes aware,agnostic] [--out benchmarks/results/quality-...json]

For each context length ``c`` and ratio ``r`` the budget is ``c // r`` tokens per KV
head and layer (window included), so the cache of a ``c``-token context shrinks about
``r`` times. vLLM reads the compression settings at engine start, so the work is grouped
by (method, budget): each group is one engine in a fresh process, running every sample
whose (context, ratio) maps to that budget, in both modes. ``none`` runs once.

Modes: ``aware`` = question at the end of the compressed prompt (inside the observation
window); ``agnostic`` = the prompt is the context only, the question is fed after
compression as forced decode tokens (see ``forcing.py``).

Writes the JSON (``{"model", "date", "command", "rows": [...]}`` + per-sample details)
and a PNG plot next to it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.machine import current_commit, gpu_name

from .engine import REPO, run_in_subprocess
from .tasks import TASKS, Builder, Sample, is_correct, make_sample

MODES = ("aware", "agnostic")
DEFAULT_METHODS = "none,snapkv,adakv,pyramidkv,streamingllm"


@dataclass(frozen=True)
class Cell:
    """One engine: a method and a budget (``None`` for the uncompressed baseline)."""

    method: str
    budget: int | None


def method_settings(label: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A method label as (method, config keys, vllm_xargs): ``"gvote@0.9"`` -> ("gvote",
    {"gvote_p": 0.9}, {"kv_gvote_p": 0.9}) (GVote's nucleus mass); ``"adakv+expected"`` ->
    ("adakv", {"scorer": "expected"}, {"kv_scorer": "expected"}) (the scorer of a scored
    method; without ``+`` a scored method names the window scorer, so that one engine
    serves labels of either scorer)."""
    from vllm_adakv.methods import REGISTRY

    label, _, scorer = label.partition("+")
    name, _, p = label.partition("@")
    cfg: dict[str, Any] = {}
    if p:
        if name != "gvote":
            raise ValueError(f"{label!r}: only gvote takes '@p' (its nucleus mass)")
        cfg["gvote_p"] = float(p)
    method = REGISTRY.get(name)
    if scorer and not (method and method.takes_scorer):
        raise ValueError(f"{label}+{scorer}: only the scored methods (snapkv, adakv, "
                         "pyramidkv) take '+scorer'")
    if method is not None and method.takes_scorer:
        cfg["scorer"] = scorer or "window"
    return name, cfg, {f"kv_{k}": v for k, v in cfg.items()}


def _csv(value: str, cast=str) -> list:
    return [cast(v) for v in value.split(",") if v.strip()]


def end_ids(tokenizer) -> set[int]:
    """Token ids that end an answer (EOS and end-of-turn markers)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for name in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return ids


def decode_answer(tokenizer, ids: list[int], stop: set[int]) -> str:
    for i, t in enumerate(ids):
        if t in stop:
            ids = ids[:i]
            break
    return tokenizer.decode(ids, skip_special_tokens=True)


def plan_cells(methods: list[str], contexts: list[int], ratios: list[int],
               window: int) -> dict[Cell, list[tuple[int, int]]]:
    """Engines to build and, for each, the (context, ratio) pairs it serves."""
    cells: dict[Cell, list[tuple[int, int]]] = defaultdict(list)
    for m in methods:
        if m == "none":
            cells[Cell("none", None)] = [(c, 1) for c in contexts]
            continue
        for c in contexts:
            for r in ratios:
                budget = c // r
                if budget <= window:
                    print(f"skip {m} {c}/{r}: budget {budget} <= window {window}",
                          file=sys.stderr)
                    continue
                cells[Cell(m, budget)].append((c, r))
    # Baseline first, then the largest budgets: a sweep cut short still compares methods.
    return dict(sorted(cells.items(), key=lambda kv: (kv[0].budget is not None,
                                                      -(kv[0].budget or 0))))


def requests_for(samples: list[Sample], modes: list[str]) -> list[dict[str, Any]]:
    reqs = []
    for s in samples:
        for mode in modes:
            rid = f"{s.task}/{s.context}/{s.index}/{mode}"
            if mode == "aware":
                reqs.append({"id": rid, "prompt": s.prefix_ids + s.question_ids, "forced": [],
                             "max_tokens": s.max_tokens})
            else:
                reqs.append({"id": rid, "prompt": s.prefix_ids, "forced": s.question_ids,
                             "max_tokens": s.max_tokens})
    return reqs


def build_samples(tokenizer, tasks: list[str], contexts: list[int], n: int,
                  seed: int) -> dict[tuple[str, int], list[Sample]]:
    """Samples ``0..n-1`` of every (task, context): what every run of the harness sends."""
    builder = Builder(tokenizer)
    return {(t, c): [make_sample(tokenizer, t, c, i, seed, builder) for i in range(n)]
            for t in tasks for c in contexts}


def cell_requests(pairs: list[tuple[int, int]], tasks: list[str],
                  samples: dict[tuple[str, int], list[Sample]],
                  modes: list[str]) -> list[dict[str, Any]]:
    """The requests of one cell: every sample of its contexts, in every mode."""
    return requests_for([s for (c, _r) in pairs for t in tasks for s in samples[(t, c)]], modes)


def score_cell(cell: Cell, pairs: list[tuple[int, int]], tasks: list[str], modes: list[str],
               samples: dict[tuple[str, int], list[Sample]], answers: dict[str, str],
               kept: dict[str, float]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows (one per context, task and mode) and per-sample details of one cell.

    ``answers``: request id -> decoded answer; ``kept``: request id -> kept tokens per
    (layer, KV head), for the compressed requests only (the others held the whole prompt).
    """
    rows: list[dict[str, Any]] = []
    details: list[dict[str, Any]] = []
    for c, r in pairs:
        for t in tasks:
            for mode in modes:
                ok, fractions = 0, []
                for s in samples[(t, c)]:
                    rid = f"{t}/{c}/{s.index}/{mode}"
                    text = answers[rid]
                    good = is_correct(t, s.answers, text)
                    ok += good
                    # Memory held: kept tokens per (layer, head) over the prompt.
                    prompt = len(s.prefix_ids) + (len(s.question_ids) if mode == "aware" else 0)
                    fraction = kept[rid] / prompt if rid in kept else 1.0
                    fractions.append(fraction)
                    details.append({"task": t, "context": c, "mode": mode,
                                    "method": cell.method, "budget": cell.budget,
                                    "index": s.index, "prompt_len": s.prompt_len,
                                    "kept_fraction": fraction, "correct": good,
                                    "answers": list(s.answers), "output": text})
                n = len(samples[(t, c)])
                rows.append({"task": t, "context": c, "mode": mode, "method": cell.method,
                             "budget": cell.budget, "compression": r, "n": n,
                             "accuracy": ok / n, "kept_fraction": sum(fractions) / n})
    return rows, details


def plot(rows: list[dict[str, Any]], png: Path, title: str) -> bool:
    """Accuracy vs compression, one line per method, one panel per mode; False if no
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    modes = sorted({r["mode"] for r in rows}, key=MODES.index)
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        by: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if r["mode"] == mode:
                by[r["method"]][r["compression"]].append((r["accuracy"], r["n"]))
        for method, pts in sorted(by.items()):
            xs = sorted(pts)
            ys = [sum(a * n for a, n in pts[x]) / sum(n for _, n in pts[x]) for x in xs]
            if method == "none":
                ax.axhline(ys[0], color="k", ls="--", label="none (full cache)")
            else:
                ax.plot(xs, ys, marker="o", label=method)
        ax.set_xscale("log", base=2)
        ticks = sorted({r["compression"] for r in rows if r["method"] != "none"})
        ax.set_xticks(ticks, [f"{t}x" for t in ticks])
        ax.set_xlabel("compression (context / budget)")
        ax.set_ylabel("accuracy (all tasks and contexts)")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"question-{mode}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model folder (prepare_model)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    ap.add_argument("--contexts", default="2048,4096,8192")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--samples", type=int, default=8, help="samples per task and context")
    ap.add_argument("--methods", default=DEFAULT_METHODS,
                    help="comma list; any method vLLM's kv_compression accepts; gvote@P "
                         "sets GVote's nucleus mass (its budget is then the cap)")
    ap.add_argument("--ratios", default="2,4,8,16")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-space", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (cpu)")
    ap.add_argument("--compression-extra", default="{}",
                    help="JSON merged into every kv_compression dict, e.g. '{\"alpha\": 0.2}'")
    ap.add_argument("--engine-extra", default="{}", help="JSON of extra LLM(...) arguments")
    ap.add_argument("--one-engine", action="store_true",
                    help="one engine for every (method, budget): each request carries its own "
                         "kv_compression / kv_budget (vllm_xargs); 'none' opts out")
    ap.add_argument("--notes", default="")
    ap.add_argument("--out", default=None, help="JSON path (PNG written next to it)")
    ap.add_argument("--log", default=None, help="append the engines' stdout here")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    model = Path(args.model).expanduser().resolve()
    name = model.name
    contexts, ratios = _csv(args.contexts, int), _csv(args.ratios, int)
    tasks, methods, modes = _csv(args.tasks), _csv(args.methods), _csv(args.modes)
    for t in tasks:
        if t not in TASKS:
            ap.error(f"unknown task {t}; known: {','.join(TASKS)}")
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m}; known: {','.join(MODES)}")
    date = dt.date.today().isoformat()
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / \
        f"quality-{name}-{date}.json"
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    extra = json.loads(args.compression_extra)

    tok = AutoTokenizer.from_pretrained(str(model))
    stop = end_ids(tok)
    samples = build_samples(tok, tasks, contexts, args.samples, args.seed)
    longest = max(s.prompt_len + s.max_tokens for v in samples.values() for s in v)
    cells = plan_cells(methods, contexts, ratios, args.window)
    print(f"{len(cells)} engines, {sum(len(v) for v in samples.values())} samples x "
          f"{len(modes)} modes", file=sys.stderr)

    rows: list[dict[str, Any]] = []
    details: list[dict[str, Any]] = []
    engines: list[dict[str, Any]] = []
    log = Path(args.log) if args.log else None
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.quality.run " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    commit, gpu = current_commit(None), gpu_name() if args.device == "cuda" else None

    def save(complete: bool) -> None:
        result = {"model": name, "date": date, "command": command, "notes": args.notes,
                  "complete": complete, "device": args.device, "gpu": gpu,
                  "commit": commit, "dtype": dtype, "host": platform.node(),
                  "window": args.window, "seed": args.seed,
                  "compression_extra": extra, "rows": rows, "engines": engines,
                  "details": details}
        out.write_text(json.dumps(result, indent=1) + "\n")

    def run_engine(comp: dict[str, Any] | None, requests: list[dict[str, Any]], tmp: str,
                   label: dict[str, Any]) -> dict[str, Any]:
        job = {"model": str(model), "dtype": dtype, "max_model_len": longest + 64,
               "compression": comp, "requests": requests,
               "engine": json.loads(args.engine_extra)}
        t0 = time.perf_counter()
        res = run_in_subprocess(job, Path(tmp), kv_space_gib=args.kv_space, log=log)
        engines.append({**label, "requests": len(requests), "load_s": round(res["load_s"], 1),
                        "generate_s": round(res["wall_s"], 1),
                        "total_s": round(time.perf_counter() - t0, 1)})
        print(f"engine {label}: {engines[-1]}", file=sys.stderr, flush=True)
        return res

    shared: dict[str, Any] = {"outputs": {}, "kept_per_head": {}}
    with tempfile.TemporaryDirectory(prefix="adakv-quality-") as tmp:
        if args.one_engine:
            # The server's own settings only matter for what a request does not set.
            compressed = [c for c in cells if c.method != "none"]
            server = None
            if compressed:
                method, cfg_extra, _ = method_settings(compressed[0].method)
                server = {"method": method, "budget": compressed[0].budget,
                          "window": args.window, **extra, **cfg_extra}
            requests = []
            for cell, pairs in cells.items():
                method, _, xargs_extra = method_settings(cell.method)
                xargs = {"kv_compression": method, **xargs_extra}
                if cell.budget is not None:
                    xargs["kv_budget"] = cell.budget
                for r in cell_requests(pairs, tasks, samples, modes):
                    requests.append({**r, "id": f"{cell.method}:{cell.budget}:{r['id']}",
                                     "xargs": xargs})
            shared = run_engine(server, requests, tmp, {"method": "per-request",
                                                        "server": server})
        for cell, pairs in cells.items():
            if args.one_engine:
                prefix = f"{cell.method}:{cell.budget}:"
                res = {key: {k[len(prefix):]: v for k, v in shared[key].items()
                             if k.startswith(prefix)} for key in ("outputs", "kept_per_head")}
            else:
                method, cfg_extra, _ = method_settings(cell.method)
                comp = None if method == "none" else {
                    "method": method, "budget": cell.budget, "window": args.window,
                    **extra, **cfg_extra}
                res = run_engine(comp, cell_requests(pairs, tasks, samples, modes), tmp,
                                 {"method": cell.method, "budget": cell.budget})
            outputs, kept = res["outputs"], res.get("kept_per_head", {})
            answers = {rid: decode_answer(tok, ids, stop) for rid, ids in outputs.items()}
            cell_rows, cell_details = score_cell(cell, pairs, tasks, modes, samples, answers,
                                                 kept)
            rows.extend(cell_rows)
            details.extend(cell_details)
            save(complete=False)  # partial results survive an interrupted sweep
    save(complete=True)
    png = out.with_suffix(".png")
    if not plot(rows, png, f"{name}: {','.join(tasks)} at {args.contexts} tokens, "
                f"n={args.samples}/task/context ({date})"):
        print("matplotlib not installed: no plot", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
