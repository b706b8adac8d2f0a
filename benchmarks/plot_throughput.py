"""Plot throughput results: output tok/s vs compression ratio, vanilla dashed.

    python -m benchmarks.plot_throughput benchmarks/results/throughput-*.json \
        --out benchmarks/results/throughput-h100.png

One line per (file, regime, input length, method, decode budget): each file's points are
measured against that file's own vanilla run, drawn dashed in the same colour (dotted: the
prefill-only bound).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_series(paths: list[Path]) -> dict[str, dict]:
    """``label -> {"ratios", "tok_s", "vanilla", "bound"}`` from the files' points."""
    series: dict[str, dict] = {}
    for path in paths:
        data = json.loads(path.read_text())
        for p in data["points"]:
            decode = f" decode {p['decode_budget']}" if p.get("decode_budget") else ""
            label = (f"{p['regime']} {p['input_len']} in / {p['output_len']} out, {p['method']}"
                     f"{decode} [{path.stem.removeprefix('throughput-')}]")
            s = series.setdefault(label, {"points": {}, "vanilla": p["vanilla_out_tok_s"],
                                          "bound": p["bound_speedup"]})
            s["points"][p["ratio"]] = p["out_tok_s"]
    return series


def plot(series: dict[str, dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (label, s) in enumerate(sorted(series.items())):
        color = f"C{i}"
        ratios = sorted(s["points"])
        ax.plot(ratios, [s["points"][r] for r in ratios], marker="o", color=color,
                label=label)
        for r in ratios:
            ax.annotate(f"{s['points'][r] / s['vanilla']:.2f}x", (r, s["points"][r]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axhline(s["vanilla"], color=color, ls="--", lw=1, label="vanilla vLLM, same run")
        ax.axhline(s["vanilla"] * s["bound"], color=color, ls=":", lw=1,
                   label=f"bound: prefill-only time ({s['bound']:.2f}x)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("compression ratio (prompt / budget)")
    ax.set_ylabel("output tokens / s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--title", default=None,
                    help="default: Llama-3.1-8B shape, <the files' GPU>, adakv vs vanilla vLLM")
    args = ap.parse_args()
    title = args.title
    if title is None:
        gpus = sorted({json.loads(f.read_text())["gpu"] for f in args.files})
        title = f"Llama-3.1-8B shape, {' / '.join(gpus)}, adakv vs vanilla vLLM 0.32"
    plot(load_series(args.files), args.out, title)
    print(args.out)


if __name__ == "__main__":
    main()
