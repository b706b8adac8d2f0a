"""Requests sent vs admitted vs running over a serving run, from its step log.

    python -m benchmarks.serving_timeline \
        benchmarks/results/serving-h200-2026-12-02-rate2-sync.json

Reads a ``benchmarks/serving.py --step-log`` result and replays each point's engine steps
on a clock: a step lasts its logged elapsed time plus the point's mean time outside that
window, ``(duration - busy) / steps``. That holds where the time outside is small and
even (vanilla vLLM: ~1.4 ms a step on the H200 run); it misplaces steps where a few steps
spend long outside the window (the plugin's prompt steps, whose host waits in the forward
for the GPU), and an idle engine makes the clock run early. The header prints that time.
Every ``--every`` seconds it prints how many requests the client had sent
(``requests.start_s``), how many prompts the engine had taken in (prompt tokens so far /
input length) and how many were decoding. Sent well above admitted while few run and KV
is far from full means requests waited before the scheduler. The warm-up requests'
steps (``--warmups``, the bench's ``--num-warmups``) are skipped: the bench starts at the
step with prompt tokens after them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def timeline(point: dict, every: float, warmups: int) -> list[dict[str, float]]:
    """Rows of (t, sent, admitted, running, kv %) every ``every`` seconds of the replay."""
    steps = point["steps"]
    summary = point["step_summary"]
    outside_s = max(0.0, point["duration_s"] - summary["busy_s"]) / max(1, summary["steps"])
    rows = list(zip(steps["ctx_tokens"], steps["gen_reqs"], steps["elapsed_ms"],
                    steps["kv_usage_pct"], strict=True))
    prompt_steps = [i for i, r in enumerate(rows) if r[0] > 0]
    start = prompt_steps[warmups] if len(prompt_steps) > warmups else 0
    sent_at = sorted(point["requests"]["start_s"])
    out, clock, tokens, due = [], 0.0, 0, 0.0
    for ctx, gen, ms, kv in rows[start:]:
        if clock >= due:
            out.append({"t_s": round(clock, 1), "sent": sum(1 for s in sent_at if s <= clock),
                        "admitted": round(tokens / point["input_len"], 1), "running": gen,
                        "kv_pct": kv})
            due += every
        clock += ms / 1e3 + outside_s
        tokens += ctx
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", type=Path, help="a serving JSON written with --step-log")
    ap.add_argument("--every", type=float, default=2.0, help="seconds between rows")
    ap.add_argument("--warmups", type=int, default=1, help="bench serve's --num-warmups")
    args = ap.parse_args()
    for point in json.loads(args.result.read_text())["points"]:
        if "steps" not in point:
            continue
        summary = point["step_summary"]
        outside = (point["duration_s"] - summary["busy_s"]) / max(1, summary["steps"])
        print(f"{point['method']} x{point['ratio']} ({point['duration_s']:.1f} s, "
              f"{outside * 1e3:.1f} ms a step outside the logged window):")
        for row in timeline(point, args.every, args.warmups):
            print(f"  t {row['t_s']:5.1f} s  sent {row['sent']:3d}  admitted "
                  f"{row['admitted']:5.1f}  running {row['running']:3d}  KV {row['kv_pct']:5.1f}%")


if __name__ == "__main__":
    main()
