"""``benchmarks/decode_event.py --smoke`` on the CPU: the layer-event it times runs (the
CUDA event path on the torch references) and its points are written (a few seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

REPO = Path(__file__).resolve().parents[2]


def test_smoke_event_selects_the_decode_budget(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "benchmarks.decode_event", "--smoke", "--out",
                    str(tmp_path)], cwd=REPO, check=True, capture_output=True, timeout=300)
    result = json.loads(next(tmp_path.glob("decode-event-cpu-*.json")).read_text())
    points = result["points"]
    assert [(p["method"], p["decode_budget"]) for p in points] == [("adakv", 96),
                                                                     ("snapkv", 96)]
    for p in points:
        assert p["host_ms"] > 0 and p["rows"] == 2
    assert points[0]["host_ms_exact_width"] > 0
