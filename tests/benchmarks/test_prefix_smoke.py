"""``benchmarks/prefix.py`` end to end on the CPU, both workloads into one results file.

shared-prefix: 8 requests = 256 shared + 64 own tokens, 16 generated, vanilla+PC and
Ada-KV at 4x (two engines). multi-turn: 2 conversations x 2 turns (128-token system
prompt, 64 user tokens, 8 generated), two OpenAI servers. The tiny dummy-weight Llama,
blocks of 32. About three minutes on 2 cores.
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


def _run(args: list[str]) -> None:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("TRITON_INTERPRET", None)  # set by the Triton kernel tests; not for vLLM
    proc = subprocess.run([sys.executable, "-m", "benchmarks.prefix", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]


def test_both_workloads_fill_one_file(tmp_path: Path) -> None:
    model = str(make_tiny_llama(tmp_path / "tiny"))
    out = str(tmp_path / "results")
    _run(["shared-prefix", "--model", model, "--prefix-len", "256", "--unique-len", "64",
          "--num-prompts", "8", "--output-len", "16", "--ratios", "4", "--commit", "abc",
          "--out", out, '--all-engines-extra={"block_size": 32, "enforce_eager": true}'])
    _run(["multi-turn", "--model", model, "--conversations", "2", "--turns", "2",
          "--system-len", "128", "--user-len", "64", "--output-len", "8", "--stagger", "0.2",
          "--ratio", "4", "--kv-cache-gib", "1", "--commit", "def", "--deadline", "300",
          "--out", out, "--extra-server-args=--block-size 32 --enforce-eager"])
    [path] = Path(out).glob("prefix-cpu-*.json")
    data = json.loads(path.read_text())
    assert list(data) == ["gpu", "date", "commit", "command", "points"]
    assert data["gpu"] == "cpu" and data["commit"] == "abc, def"
    sp_none, sp_ours, mt_none, mt_ours = data["points"]
    assert [(p["workload"], p["method"], p["ratio"]) for p in data["points"]] == [
        ("shared-prefix", "none", None), ("shared-prefix", "adakv", 4),
        ("multi-turn", "none", None), ("multi-turn", "adakv", 4)]
    for p in data["points"]:
        assert p["seconds"] > 0 and p["req_s"] > 0 and p["ttft_p50_ms"] > 0
        assert p["speedup_vs_vanilla_pc"] == pytest.approx(
            p["vanilla_pc_seconds"] / p["seconds"])
    # vanilla: every request but the first hits the whole shared prefix (8 blocks)
    assert sp_none["prefix_cache_hit_tokens"] == 7 * 256 and sp_none["max_running"] == 8
    assert (sp_ours["budget"], sp_ours["prefix_cache_at_start"]) == (80, "cold")
    assert sp_ours["peak_kv_blocks"] > sp_none["peak_kv_blocks"]  # no sharing for ours
    # multi-turn: 4 answered turns each; vanilla's second turns hit their first turn
    for p in (mt_none, mt_ours):
        assert (p["completed"], p["failed"], p["cut_at_deadline"]) == (4, 0, False)
        assert [r["prompt_len"] for r in p["requests"]] == [192, 264, 192, 264]
    assert mt_none["server_prefix_cache_hits"] >= 192 + 128 + 192
    assert mt_none["cached_tokens"] == mt_none["server_prefix_cache_hits"]
    assert mt_ours["requests_compressed"] == 4 and mt_ours["vllm_xargs"] == {
        "kv_compression_ratio": 4}
