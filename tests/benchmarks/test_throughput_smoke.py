"""``benchmarks/throughput.py`` end to end on the CPU at the smallest size that compresses.

Vanilla + prefill-only in one engine, the plugin loaded with compression off, and
Ada-KV at ratios 1 and 4 in one shared engine (each point's requests carry their
budget), then GVote at ratio 4 in its own engine against the same vanilla run. The tiny
dummy-weight Llama, 6 prompts of 300 tokens, 6 generated tokens, blocks of 32. About two
minutes on 2 cores.
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


def test_shared_engine_points(tmp_path: Path) -> None:
    model = make_tiny_llama(tmp_path / "tiny")
    out = tmp_path / "results"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("TRITON_INTERPRET", None)  # set by the Triton kernel tests; not for vLLM
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.throughput", "--model", str(model),
         "--regime", "B", "--input-len", "300", "--output-len", "6", "--num-prompts", "6",
         "--ratios", "1,4", "--method", "adakv,gvote", "--dtype", "float32", "--flag-off",
         "--out", str(out),
         '--all-engines-extra={"block_size": 32, "enforce_eager": true}'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = list(out.glob("throughput-*-B300.json"))
    assert len(files) == 1, proc.stdout[-2000:]
    result = json.loads(files[0].read_text())
    assert result["engines"] == "one per method"
    assert result["vanilla"]["out_tokens"] == 6 * 6
    assert result["prefill_only"]["out_tokens"] == 6
    assert result["flag_off"]["out_tokens"] == 6 * 6
    assert [(p["method"], p["ratio"]) for p in result["points"]] == [
        ("adakv", 1), ("adakv", 4), ("gvote", 1), ("gvote", 4)]
    by_ratio = {p["ratio"]: p for p in result["points"] if p["method"] == "adakv"}
    for point in result["points"]:
        assert point["out_tokens"] == 6 * 6
        assert point["engine_points"] == 2
        assert point["decode_budget"] == 0 and "decode_interval" not in point
        assert point["speedup"] == pytest.approx(
            point["out_tok_s"] / result["vanilla"]["out_tok_s"])
        assert point["bound_speedup"] == pytest.approx(
            result["vanilla"]["wall_s"] / result["prefill_only"]["wall_s"])
    # The budget of each point reached the scheduler: ratio 4 freed blocks, ratio 1 did not.
    assert by_ratio[4]["mean_kv_blocks"] < 0.6 * by_ratio[1]["mean_kv_blocks"]
    assert by_ratio[1]["mean_kv_blocks"] == pytest.approx(result["vanilla"]["mean_kv_blocks"],
                                                          rel=0.2)
    gvote = {p["ratio"]: p for p in result["points"] if p["method"] == "gvote"}
    assert gvote[4]["mean_kv_blocks"] < 0.6 * gvote[1]["mean_kv_blocks"]  # its cap: 75
