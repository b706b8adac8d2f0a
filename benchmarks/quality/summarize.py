"""Summaries of quality runs: accuracy per (mode, method, ratio), paired tests, memory curves.

    python -m benchmarks.quality.summarize RUN.json[:METHOD,...] [RUN.json ...] \\
        [--pairs adakv:adakv+expected,snapkv:snapkv+expected] [--png curve.png]

Runs are merged by their per-sample ``details`` (same model and samples expected; a
(method, budget, task, context, index, mode) seen twice is an error: ``RUN.json:A,B``
takes only methods A and B of that run, e.g. the presses of a kvpress reference run
without its own full-cache baseline). Prints, for each
mode, a markdown table: correct / total over every task and context of a method and
ratio, the share of the full cache's correct answers, and the mean kept fraction of the
prompt (memory). ``--pairs A:B`` compares B with A on the same samples at each ratio and
mode (exact McNemar: a two-sided binomial test on the samples only one of them got
right). ``--png``: accuracy against mean kept fraction, one panel per mode, one line per
method (GVote's points from its nucleus-mass sweep, ``gvote@p``).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

Key = tuple[str, int]  # (method, compression ratio)


def load_details(paths: list[Path | str]) -> list[dict[str, Any]]:
    """Every per-sample entry of the runs, each once; ``"run.json:A,B"`` keeps only the
    entries of methods A and B of that run."""
    seen: set[tuple] = set()
    out = []
    for spec in paths:
        path, _, only = str(spec).partition(":")
        keep = set(filter(None, only.split(",")))
        for d in json.loads(Path(path).read_text())["details"]:
            if keep and d["method"] not in keep:
                continue
            key = (d["method"], d["budget"], d["task"], d["context"], d["index"], d["mode"])
            if key in seen:
                raise ValueError(f"{path}: {key} is in two runs")
            seen.add(key)
            out.append(d)
    return out


def ratio_of(d: dict[str, Any]) -> int:
    """The compression a sample ran at: context / budget (1 for the full cache)."""
    return 1 if d["budget"] is None else round(d["context"] / d["budget"])


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value: binomial(n, 1/2) on the discordant pairs."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def cells(details: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[tuple, dict]]:
    """(mode, method, ratio) -> {(task, context, index): detail}."""
    out: dict[tuple[str, str, int], dict[tuple, dict]] = defaultdict(dict)
    for d in details:
        out[(d["mode"], d["method"], ratio_of(d))][(d["task"], d["context"], d["index"])] = d
    return out


def table(details: list[dict[str, Any]], mode: str) -> str:
    """Markdown: one row per (method, ratio) of ``mode``."""
    by = {k: v for k, v in cells(details).items() if k[0] == mode}
    full = [v for (m, method, _), v in by.items() if method == "none"]
    full_ok = sum(d["correct"] for d in full[0].values()) if full else None
    lines = [f"question-{mode}: correct of n over every task and context",
             "", "| method | ratio | correct / n | of full | mean kept |", "|---|---|---|---|---|"]
    for (_, method, ratio), samples in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        ok, n = sum(d["correct"] for d in samples.values()), len(samples)
        kept = sum(d["kept_fraction"] for d in samples.values()) / n
        share = f"{100 * ok / full_ok:.0f}%" if full_ok else "-"
        lines.append(f"| {method} | {ratio}x | {ok} / {n} | {share} | {kept:.3f} |")
    return "\n".join(lines)


def paired(details: list[dict[str, Any]], a: str, b: str) -> list[str]:
    """McNemar of ``b`` against ``a`` at every (mode, ratio) both ran."""
    by = cells(details)
    out = []
    for (mode, method, ratio), sa in sorted(by.items()):
        if method != a or (mode, b, ratio) not in by:
            continue
        sb = by[(mode, b, ratio)]
        common = sa.keys() & sb.keys()
        only_a = sum(sa[k]["correct"] and not sb[k]["correct"] for k in common)
        only_b = sum(sb[k]["correct"] and not sa[k]["correct"] for k in common)
        out.append(f"{mode} {ratio}x: {a} {sum(sa[k]['correct'] for k in common)} vs {b} "
                   f"{sum(sb[k]['correct'] for k in common)} of {len(common)}; only {a} "
                   f"{only_a}, only {b} {only_b}: exact McNemar p = "
                   f"{mcnemar_p(only_a, only_b):.3g}")
    return out


def plot_memory(details: list[dict[str, Any]], png: Path, title: str) -> bool:
    """Accuracy against mean kept fraction; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    by = cells(details)
    modes = sorted({m for m, _, _ in by})
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for (m, method, _), samples in by.items():
            if m != mode:
                continue
            n = len(samples)
            point = (sum(d["kept_fraction"] for d in samples.values()) / n,
                     sum(d["correct"] for d in samples.values()) / n)
            lines[method.split("@")[0] if method.startswith("gvote") else method].append(point)
        for method, pts in sorted(lines.items()):
            pts.sort()
            if method == "none":
                ax.axhline(pts[0][1], color="k", ls="--", label="none (full cache)")
            else:
                ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        ax.set_xlabel("mean kept fraction of the prompt (memory)")
        ax.set_ylabel("accuracy (all tasks and contexts)")
        ax.set_xlim(0, 1.02)
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
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality.summarize",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="RUN.json, or RUN.json:A,B for methods A, B only")
    ap.add_argument("--pairs", default="", help="comma list of A:B method pairs")
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    details = load_details(args.runs)
    for mode in sorted({d["mode"] for d in details}):
        print(table(details, mode), end="\n\n")
    for pair in filter(None, args.pairs.split(",")):
        a, _, b = pair.partition(":")
        print("\n".join(paired(details, a, b)))
    if args.png and not plot_memory(details, args.png, args.title):
        print("matplotlib not installed: no plot")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
