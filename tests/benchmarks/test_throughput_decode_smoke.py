"""``benchmarks/throughput.py`` with decode-time compression, end to end on the CPU.

Regime D's shape at the smallest size where events free blocks: vanilla + prefill-only
in one engine, then Ada-KV with prompt budget 96 given directly (``--budgets``) and
decode budget 96 (``--decode-budgets``, interval 32) in an engine of its own. The tiny
dummy-weight Llama (2 KV heads), 4 prompts of 300 tokens, 100 generated tokens, blocks
of 32: events at 32, 64 and 96 generated tokens, the last two freeing a tail block each.
About a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from adakv_devtools.tiny_model import make_tiny_llama  # noqa: E402

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def test_decode_budget_point(tmp_path: Path) -> None:
    model = make_tiny_llama(tmp_path / "tiny")
    out = tmp_path / "results"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("TRITON_INTERPRET", None)  # set by the Triton kernel tests; not for vLLM
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.throughput", "--model", str(model),
         "--regime", "D", "--input-len", "300", "--output-len", "100", "--num-prompts", "4",
         "--budgets", "96", "--decode-budgets", "96", "--decode-interval", "32",
         "--dtype", "float32", "--reserve-output", "100", "--out", str(out),
         '--all-engines-extra={"block_size": 32, "enforce_eager": true}'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = list(out.glob("throughput-*-D300.json"))
    assert len(files) == 1, proc.stdout[-2000:]
    result = json.loads(files[0].read_text())
    assert result["engines"] == "one per method and decode budget"
    point, = result["points"]
    assert point["regime"] == "D"
    assert (point["budget"], point["ratio"]) == (96, 300 / 96)
    assert (point["decode_budget"], point["decode_interval"]) == (96, 32)
    assert point["out_tokens"] == 4 * 100
    assert point["speedup"] == pytest.approx(
        point["out_tok_s"] / result["vanilla"]["out_tok_s"])
    assert point["bound_speedup"] == pytest.approx(
        result["vanilla"]["wall_s"] / result["prefill_only"]["wall_s"])
    # The decode budget reached the engine: its events gave blocks back.
    assert point["decode_released_blocks"] > 0
    assert "decode_released_blocks" not in result["vanilla"]
