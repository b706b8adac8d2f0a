"""``benchmarks/detokenize_cost.py`` end to end at a small size (structure, not speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")

REPO = Path(__file__).resolve().parents[2]


def test_reports_each_tokenizer_per_request(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(
        {"vocab_size": 5000, "bos_token_id": 1, "eos_token_id": 2}))
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.detokenize_cost", "--model", str(model),
         "--prompt-len", "300", "--output-len", "60", "--requests", "2", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (path,) = out.glob("detokenize-cpu-*.json")
    result = json.loads(path.read_text())
    assert {"date", "machine", "command", "results"} <= result.keys()
    assert [r["tokenizer_vocab"] for r in result["results"]] == [512, 5000]
    for row in result["results"]:
        assert row["request_s"] > 0 and row["first50_step_ms"] > 0
