"""``benchmarks/serving.py`` end to end on the CPU at the smallest size that compresses.

Two OpenAI servers (vanilla, Ada-KV at 4x) on the tiny dummy-weight Llama, vLLM's
``bench serve`` against each (4 prompts of 256 tokens, 8 generated, Poisson arrivals);
blocks of 32 tokens so that a budget of 64 frees blocks. About a minute on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from adakv_devtools.tiny_model import make_tiny_llama  # noqa: E402

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
NUM_PROMPTS = 4


def test_serving_vanilla_vs_adakv(tmp_path: Path) -> None:
    model = make_tiny_llama(tmp_path / "tiny")  # no weights: --load-format dummy
    out = tmp_path / "results"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("TRITON_INTERPRET", None)  # set by the Triton kernel tests; not for vLLM
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.serving", "--model", str(model),
         "--input-len", "256", "--output-len", "8", "--num-prompts", str(NUM_PROMPTS),
         "--request-rate", "8", "--ratio", "4", "--num-warmups", "0", "--kv-cache-gib", "1",
         "--reserve-output", "8", "--port", "0", "--out", str(out), "--step-log",
         "--extra-server-args=--block-size 32 --enforce-eager"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]

    [path] = out.glob("serving-cpu-*.json")
    result = json.loads(path.read_text())
    assert {"gpu", "date", "command", "model_shape", "points"} <= result.keys()
    assert result["gpu"] == "cpu" and result["model_shape"] == "tiny"
    vanilla, ours = result["points"]
    assert (vanilla["method"], ours["method"]) == ("none", "adakv")
    assert (ours["ratio"], ours["budget"]) == (4, 64)
    for point in (vanilla, ours):
        assert point["completed"] == NUM_PROMPTS and point["failed"] == 0
        for key in ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms",
                    "request_throughput", "output_tok_s"):
            assert math.isfinite(point[key]) and point[key] > 0, (point["method"], key)
        # where each request's time went, from the server's histograms, and every request
        assert point["prefill_time_mean_s"] > 0 and point["decode_time_mean_s"] > 0
        assert point["queue_time_mean_s"] >= 0
        requests = point["requests"]
        assert len(requests["ttft_s"]) == len(requests["start_s"]) == NUM_PROMPTS
        assert min(requests["start_s"]) == 0 and requests["output_len"] == [8] * NUM_PROMPTS
        assert all(0 < t <= lat for t, lat in zip(requests["ttft_s"], requests["latency_s"],
                                                  strict=True))
        # every step the engine ran is logged: all prompt tokens and all generated tokens
        # but each request's first (it comes from the prefill step)
        steps, summary = point["steps"], point["step_summary"]
        assert sum(steps["ctx_tokens"]) == point["total_input_tokens"]
        assert sum(steps["gen_reqs"]) == point["total_output_tokens"] - NUM_PROMPTS
        assert summary["steps"] == summary["decode_steps"] + summary["mixed_steps"]
        assert 0 < summary["busy_s"] <= point["duration_s"]
        assert 0 <= summary["kv_usage_pct_max"] <= 100  # tiny model: rounds to 0.0%
    # compression happened on the adakv server and not on the vanilla one
    assert ours["requests_compressed"] >= NUM_PROMPTS and ours["blocks_released"] > 0
    assert "requests_compressed" not in vanilla
    assert set(ours["vs_vanilla"]) >= {"ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms",
                                       "tpot_p99_ms", "request_throughput", "output_tok_s"}
    assert all(math.isfinite(v) for v in ours["vs_vanilla"].values())


def test_parse_metrics_sums_labels_and_takes_histogram_means() -> None:
    from benchmarks.serving import parse_metrics

    text = "\n".join([
        '# HELP vllm:num_preemptions_total x', 'vllm:num_preemptions_total{engine="0"} 2.0',
        'vllm:num_preemptions_total{engine="1"} 1.0',
        'vllm:request_queue_time_seconds_sum{engine="0"} 3.0',
        'vllm:request_queue_time_seconds_count{engine="0"} 4.0',
        'vllm:request_prefill_time_seconds_sum{engine="0"} 1.0',
        'vllm:request_prefill_time_seconds_count{engine="0"} 0.0',
        'vllm:request_prefill_time_seconds_bucket{engine="0",le="0.5"} 9.0',
        'vllm_adakv:compression_ratio_sum 16.0', 'vllm_adakv:compression_ratio_count 2.0'])
    assert parse_metrics(text) == {"preemptions": 3.0, "queue_time_mean_s": 0.75,
                                   "compression_ratio_mean": 8.0}


def test_parse_iterations_reads_vllm_step_lines_and_splits_decode_from_mixed() -> None:
    from benchmarks.serving import parse_iterations, summarize_steps

    log = ("(EngineCore pid=7) INFO 12-02 02:10:12 [loggers.py:201] Iteration(3): 1 context "
           "requests, 6000 context tokens, 4 generation requests, 4 generation tokens, "
           "iteration elapsed time: 300.50 ms, GPU KV cache usage: 12.5%\n"
           "INFO unrelated line\n"
           "Iteration(4): 0 context requests, 0 context tokens, 5 generation requests, "
           "5 generation tokens, iteration elapsed time: 9.00 ms (dummy), GPU KV cache "
           "usage: 12.6%\n")
    steps = parse_iterations(log)
    assert steps == {"ctx_reqs": [1, 0], "ctx_tokens": [6000, 0], "gen_reqs": [4, 5],
                     "elapsed_ms": [300.5, 9.0], "kv_usage_pct": [12.5, 12.6]}
    summary = summarize_steps(steps)
    assert (summary["decode_steps"], summary["mixed_steps"], summary["running_max"]) == (1, 1, 5)
    assert summary["busy_s"] == 0.3095 and summary["decode_step_ms_mean"] == 9.0
    assert summary["mixed_ms_per_1k_ctx_tokens"] == 300.5 / 6
