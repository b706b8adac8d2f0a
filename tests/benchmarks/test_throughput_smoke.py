"""``benchmarks/throughput.py`` end to end on the CPU at the smallest size that compresses.

Vanilla + prefill-only in one engine, the plugin loaded with compression off, and
Ada-KV at ratios 1 and 4 in one shared engine (each point's requests carry their
budget), then GVote at ratio 4 in its own engine against the same vanilla run. The tiny
dummy-weight Llama, 6 prompts of 300 tokens, 6 generated tokens, blocks of 32. About two
minutes on 2 cores. Then a regime D point with decode-time compression.
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


def run_throughput(tmp_path: Path, args: list[str], name: str, timeout: int) -> dict:
    """``benchmarks.throughput`` on a tiny dummy-weight Llama (fp32, blocks of 32, eager)
    with ``args``; its one result file ``throughput-*-<name>.json``, read."""
    model = make_tiny_llama(tmp_path / "tiny")
    out = tmp_path / "results"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("TRITON_INTERPRET", None)  # set by the Triton kernel tests; not for vLLM
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.throughput", "--model", str(model), *args,
         "--dtype", "float32", "--out", str(out),
         '--all-engines-extra={"block_size": 32, "enforce_eager": true}'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = list(out.glob(f"throughput-*-{name}.json"))
    assert len(files) == 1, proc.stdout[-2000:]
    return json.loads(files[0].read_text())


def test_shared_engine_points(tmp_path: Path) -> None:
    result = run_throughput(
        tmp_path, ["--regime", "B", "--input-len", "300", "--output-len", "6",
                   "--num-prompts", "6", "--ratios", "1,4", "--method", "adakv,gvote",
                   "--flag-off"], "B300", timeout=900)
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


def test_decode_budget_point(tmp_path: Path) -> None:
    """Regime D with decode-time compression at the smallest size where events free
    blocks: Ada-KV with prompt budget 96 given directly (``--budgets``) and decode budget
    96 (``--decode-budgets``, interval 32) in an engine of its own; 4 prompts of 300
    tokens, 100 generated: events at 32, 64 and 96 generated tokens, the last two freeing
    a tail block each. About a minute on 2 cores."""
    result = run_throughput(
        tmp_path, ["--regime", "D", "--input-len", "300", "--output-len", "100",
                   "--num-prompts", "4", "--budgets", "96", "--decode-budgets", "96",
                   "--decode-interval", "32", "--reserve-output", "100"], "D300",
        timeout=600)
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
