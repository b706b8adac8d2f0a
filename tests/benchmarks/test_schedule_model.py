"""benchmarks/schedule_model.py on the committed H200 run: calibrated, and it tells the
two regimes apart (at 8x two decode waves, at 64x one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "benchmarks/results/throughput-h200-2026-12-01-B6000.json"


def test_model_of_the_h200_run(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.schedule_model", "--from-run",
                           str(RUN), "--out", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("schedule-model-*.json")).read_text())
    measured = json.loads(RUN.read_text())
    # Calibrated on the run's own step costs: vanilla within 10% of what was measured.
    assert abs(result["vanilla_model"]["wall_s"] / measured["vanilla"]["wall_s"] - 1) < 0.1
    by_ratio = {p["ratio"]: p for p in result["points"]}
    out_len = measured["points"][0]["output_len"]
    assert by_ratio[8]["model"]["decode_steps"] > 1.8 * out_len  # memory: two waves
    assert by_ratio[64]["model"]["decode_steps"] < 1.1 * out_len  # all at once
    assert by_ratio[8]["model"]["preemptions"] == by_ratio[64]["model"]["preemptions"] == 0
    for p in by_ratio.values():  # no overheads of ours in the model: never slower
        assert p["model"]["wall_s"] <= p["measured_wall_s"]


def test_fixed_cost_of_mixed_steps_adds_once_per_prompt_step() -> None:
    from benchmarks.schedule_model import simulate

    common = dict(num_prompts=8, input_len=1000, output_len=50, kept_blocks=8, capacity=400,
                  block_size=16, step_tokens=512, token_s=1e-5, decode_s=5e-3, reserve=True)
    base = simulate(**common)
    fixed = simulate(**common, mixed_fixed_s=0.02)
    prompt_steps = base["steps"] - base["decode_steps"]
    assert prompt_steps >= 8 * 1000 // 512  # every prompt token went through a prompt step
    assert fixed["steps"] == base["steps"]  # the schedule itself is unchanged
    assert abs(fixed["wall_s"] - base["wall_s"] - 0.02 * prompt_steps) < 1e-9
